"""Step time and peak memory of the model-parallel softmax head against a plain full-softmax head.

    python -m benchmarks.perf.model_parallel_softmax --classes 100000 1000000 --batch 128 \
        --dim 512 --world-sizes 1 2 --out runs/perf/model_parallel_softmax.json

For every (classes C, per-rank batch B, embedding D, world size W) it measures, in fresh
processes, one training step (forward, backward, SGD-with-momentum update of the head) of

- ``plain``: one process holding all C centres, ``F.linear`` over all classes for the global
  batch N = B·W, then cross-entropy with the ArcFace margin (the single-device baseline);
- ``model_parallel``: W processes (gloo on CPU, NCCL on GPUs), each holding C/W centres, as
  :class:`~lightning_modules.distributed.model_parallel_softmax.ModelParallelSoftmax` computes it
  (``--chunk-classes`` classes of logits at a time, the element-wise work between the
  products compiled with ``--compile-chunks``) and updated by the recipe's fused SGD;
- ``partial_fc``: the same with ``--sample-rate`` (when < 1).

and prints a table of median step time and peak memory per rank, with the ratio to ``plain``
measured in the same run; the JSON has every number. Peak memory is taken over the timed
steps, so it holds the centres, their gradient and momentum and the step's temporaries, but
not the transients of building the head: on GPU ``torch.cuda.max_memory_allocated`` (reset
after the set-up), on CPU the peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident set before the set-up, measured after two steps
on a tiny head so that the code they run is already resident.

``--precision`` sets the matmuls: ``32`` (full fp32), ``tf32`` (fp32 storage, TF32 tensor-core
products on GPUs) or ``bf16-mixed`` (autocast; the softmax stays in fp32).

Memory per rank (fp32, SGD with momentum), N = B·W the global batch:

- parameters, gradient, momentum of the centres: 3 · (C/W) · D · 4 bytes;
- logits and their temporaries: k · N · min(chunk, C/W) · 4 bytes, k the number of
  [N, chunk] tensors alive at once: about 2 with compiled chunks (the products f·wᵀ and the
  gradient Ĝ), a few more op by op (cosines, margin logits, exponentials, their gradients),
  chunk = ``--chunk-classes``; never N · C/W, let alone N · C;
- embeddings gathered from all ranks: N · D · 4 bytes.

Communication per step and rank: the all-gather of embeddings (N·D floats) and labels (N), two
all-reduces of N floats for the normaliser (max, sum of exponentials) and two for the target
cosines (for the head's per-sample state, then with gradient), the head's statistics (N or 2N floats), and in backward the reduce-scatter of the
gathered embeddings' gradient (N·D floats in, N·D/W out per rank: half an all-reduce's traffic).
Independent of C: the class dimension never travels.

Memory traffic per step, counted in reads or writes of a [C/W, D] tensor (fp32: C/W·D·4
bytes): the forward's norms and product, 2 (NPCFace: one more product, for its statistics);
the backward's recomputed product, 1, its two gradient products, 2 (read the centres, write
their gradient), and the radial correction of the centres' gradient, 3 (read gradient and
centres, write gradient); the fused SGD step, 5 (read centres, gradient, momentum; write
centres, momentum): 13 in all. Exact 10M classes at D = 512 on one GPU: 13 × 20.5 GB = 266 GB,
about 89 ms at the 3 TB/s an H100 moves. Fewer only where a chunk's centres and gradient stay
in the GPU's L2 cache between the chunk's kernels (smaller ``--chunk-classes``; a chunk of
8,192 classes at D = 512 is 17 MB, an H100's L2 50 MB) or where kernels are fused further
(norms into the forward product, the radial correction into the gradient product). The
floor is 8, about 55 ms: one read of the centres in the forward and one in the backward, one
write of their gradient, and the SGD step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_modules.distributed.model_parallel_softmax import ModelParallelSoftmax, SoftmaxOptions
from lightning_modules.nn.margins import CombinedMarginHead


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resident_bytes(field: str) -> int:
    """A Linux memory figure of this process: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: CPU memory is measured on Linux only")


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _peak_memory_bytes(device: torch.device, resident_before_setup: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _resident_bytes("VmHWM") - resident_before_setup


def _time_steps(step, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _write_profile(step, device: torch.device, path: Path) -> None:
    """torch.profiler's table of one step's operators (and kernels), by total time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=60))


def _autocast(precision: str, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def _plain_step_fn(classes: int, batch: int, dim: int, precision: str, device: torch.device):
    head = CombinedMarginHead()
    weight = torch.nn.Parameter(torch.empty(classes, dim, device=device).normal_(0.0, 0.01))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    embeddings = torch.randn(batch, dim, device=device, requires_grad=True)
    labels = torch.randint(classes, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision, device):
            cos = F.linear(F.normalize(embeddings), F.normalize(weight)).float()
        F.cross_entropy(head(cos, labels), labels).backward()
        optimizer.step()

    return step


def _model_parallel_step_fn(classes: int, batch: int, dim: int, case: dict, device: torch.device):
    options = SoftmaxOptions(sample_rate=case["sample_rate"], chunk_classes=case["chunk_classes"],
                             compile_chunks=case["compile_chunks"])
    softmax = ModelParallelSoftmax(classes, dim, CombinedMarginHead(), options).to(device)
    optimizer = torch.optim.SGD(softmax.parameters(), lr=0.1, momentum=0.9, fused=True)
    generator = torch.Generator(device=device).manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    embeddings = torch.randn(batch, dim, device=device, generator=generator, requires_grad=True)
    labels = torch.randint(classes, (batch,), device=device, generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(case["precision"], device):
            loss = softmax(embeddings, labels)
        loss.backward()
        optimizer.step()

    return step


def _worker(rank: int, world_size: int, port: int, case: dict, out: str) -> None:
    """One process of one measurement; writes its times and peak memory to ``out``.rank."""
    use_cuda = case["device"] == "cuda"
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    torch.set_num_threads(max(1, case["threads"] // world_size))
    torch.set_float32_matmul_precision("high" if case["precision"] == "tf32" else "highest")
    if case["kind"] != "plain":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)

    def build_step(classes: int):
        if case["kind"] == "plain":
            return _plain_step_fn(classes, case["batch"] * case["world_size"], case["dim"], case["precision"], device)
        return _model_parallel_step_fn(classes, case["batch"], case["dim"], case, device)

    try:
        # Two steps on a tiny head first: the code the step runs is then resident (a CPU
        # process's resident set grows by hundreds of MiB of library code on first use).
        warm_up = build_step(8 * world_size)
        warm_up()
        warm_up()
        del warm_up
        resident_before_setup = 0 if use_cuda else _resident_bytes("VmRSS")
        step = build_step(case["classes"])
        step()  # untimed: allocates the momentum, compiles the chunks' kernels for their shapes
        _reset_peak_memory(device)
        times = _time_steps(step, case["steps"], device)
        result = {"times": times, "peak_memory": _peak_memory_bytes(device, resident_before_setup)}
        if case["profile"] is not None:
            name = f"{case['kind']}_C{case['classes']}_W{case['world_size']}_{case['precision']}_r{rank}.txt"
            _write_profile(step, device, Path(case["profile"]) / name)
    except torch.OutOfMemoryError:
        result = {"times": None, "peak_memory": None, "error": "out of memory"}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def measure(case: dict) -> dict:
    """Run one case in fresh processes; per-rank results merged (slowest step, largest memory)."""
    processes = 1 if case["kind"] == "plain" else case["world_size"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.start_processes(_worker, args=(processes, _free_port(), case, out), nprocs=processes, start_method="spawn")
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(processes)]
    if any(r.get("error") for r in ranks):
        return {**case, "step_time_s": None, "peak_memory_bytes": None, "error": ranks[0].get("error", "failed")}
    step_times = [max(ts) for ts in zip(*(r["times"] for r in ranks))]
    return {**case, "step_time_s": statistics.median(step_times), "peak_memory_bytes": max(r["peak_memory"] for r in ranks)}


def _format_table(rows: list[dict]) -> str:
    lines = [
        "| classes | batch/rank | dim | world | head | step (ms) | x plain | peak mem/rank (MiB) | x plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {(r["classes"], r["batch"], r["dim"], r["world_size"]): r for r in rows if r["kind"] == "plain"}
    for r in rows:
        ref = plain.get((r["classes"], r["batch"], r["dim"], r["world_size"]))
        if r.get("error"):
            lines.append(f"| {r['classes']} | {r['batch']} | {r['dim']} | {r['world_size']} | {r['kind']} | {r['error']} | | | |")
            continue
        memory = r["peak_memory_bytes"]
        ref_memory = None if ref is None or ref.get("error") else ref["peak_memory_bytes"]
        time_ratio = "" if ref is None or ref.get("error") else f"{r['step_time_s'] / ref['step_time_s']:.2f}"
        memory_ratio = "" if not ref_memory else f"{memory / ref_memory:.2f}"
        lines.append(
            f"| {r['classes']} | {r['batch']} | {r['dim']} | {r['world_size']} | {r['kind']} | "
            f"{1000 * r['step_time_s']:.1f} | {time_ratio} | {memory / 2**20:.0f} | {memory_ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sample-rate", type=float, default=1.0, help="also measure Partial FC when < 1")
    parser.add_argument("--chunk-classes", type=int, default=65536, help="classes per chunk of logits")
    parser.add_argument("--precision", choices=["32", "tf32", "bf16-mixed"], default="32")
    parser.add_argument(
        "--compile-chunks", action=argparse.BooleanOptionalAction, default=False,
        help="fuse the element-wise work of each chunk with torch.compile (default: op by op, as the head)",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/perf/model_parallel_softmax.json"))
    parser.add_argument("--profile", type=Path, help="also write each case's torch.profiler table of one step here")
    parser.add_argument("--skip-plain", action="store_true",
                        help="leave out the plain head (it cannot hold 10M classes' logits on one GPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and max(args.world_sizes) > torch.cuda.device_count():
        parser.error(f"--world-sizes {max(args.world_sizes)} needs as many GPUs; {torch.cuda.device_count()} found")

    kinds = ([] if args.skip_plain else ["plain"]) + ["model_parallel"] + (["partial_fc"] if args.sample_rate < 1 else [])
    rows = []
    for classes in args.classes:
        for world_size in args.world_sizes:
            for kind in kinds:
                case = {
                    "kind": kind, "classes": classes, "batch": args.batch, "dim": args.dim, "world_size": world_size,
                    "sample_rate": args.sample_rate if kind == "partial_fc" else 1.0, "steps": args.steps,
                    "chunk_classes": args.chunk_classes, "compile_chunks": args.compile_chunks,
                    "precision": args.precision,
                    "device": args.device, "threads": torch.get_num_threads(),
                    "profile": None if args.profile is None else str(args.profile),
                }
                rows.append(measure(case))
                print(f"measured {kind} C={classes} W={world_size}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))
    print(_format_table(rows))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
