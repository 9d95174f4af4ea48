#!/usr/bin/env bash
# The GPU measurements of the GPU-path issue, prepared to run once on a lent GPU (one device
# command of at most 10 minutes): each part in priority order under its own time limit, so a
# slow part costs only itself, every result written to $OUT as it comes (at most 8 files).
#
#   1. correctness on CUDA: the compiled softmax chunks against the CPU ops (float64, float32,
#      the graph count), tests/lightning_modules/test_model_parallel_softmax.py -k cuda;
#   2. the model-parallel softmax at its targets, B = 512, D = 512, fp32 centres, SGD with
#      momentum: 1M classes against the plain full-softmax head in the same run, then 10M
#      classes compiled at two chunk sizes and op by op (benchmarks/perf/model_parallel_softmax.py);
#   3-4. the MS1M ArcFace step (iResNet-50, batch 128, bf16-mixed, channels_last) under a raw
#      PyTorch loop, a plain Lightning loop, visionzoo's default callbacks and run log, the same
#      without the NaN guard, and with the guard's deferred check (benchmarks/perf/training_step.py).
#
# The device image has torch, lightning and timm but not torchdata, which visionzoo's framework
# module imports: its wheel travels in .whl (pure Python), made here once with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl torchdata==0.11.0
# and the call is  run(command="bash benchmarks/perf/gpu_session.sh", timeout_s=600, carry=[".whl"]).
set -u
OUT=${OUT:-runs/perf/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
part() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

part "device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| lightning', lightning.__version__)"
} >> "$LOG" 2>&1

part "1. compiled softmax chunks on CUDA against the CPU ops"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/lightning_modules/test_model_parallel_softmax.py -k cuda >> "$LOG" 2>&1
echo "pytest exit $?" >> "$LOG"

SOFTMAX="python3 -m benchmarks.perf.model_parallel_softmax --batch 512 --dim 512 --world-sizes 1 --precision 32 --steps 5"
part "2a. 1M classes: plain head against the compiled model-parallel head"
timeout 100 $SOFTMAX --classes 1000000 --compile-chunks --out "$OUT/softmax_1m.json" >> "$LOG" 2>&1
for chunk in 65536 16384; do
    part "2b. 10M classes, compiled chunks of $chunk"
    timeout 80 $SOFTMAX --classes 10000000 --skip-plain --compile-chunks --chunk-classes "$chunk" \
        --out "$OUT/softmax_10m_compiled_$chunk.json" >> "$LOG" 2>&1
done
part "2c. 10M classes, op by op"
timeout 80 $SOFTMAX --classes 10000000 --skip-plain --no-compile-chunks --out "$OUT/softmax_10m_eager.json" >> "$LOG" 2>&1

part "3-4. the ArcFace iResNet-50 step: raw PyTorch, plain Lightning, visionzoo"
timeout 110 python3 -m benchmarks.perf.training_step --backbone iresnet50 --classes 93431 --batch 128 --precision bf16-mixed \
    --steps 60 --warmup 10 --run-dir /tmp/training_step --out "$OUT/training_step.json" >> "$LOG" 2>&1
part "done"
