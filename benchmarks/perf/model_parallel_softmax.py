"""Step time and peak memory of the model-parallel softmax head against a plain full-softmax head.

    python -m benchmarks.perf.model_parallel_softmax --classes 100000 1000000 --batch 128 \
        --dim 512 --world-sizes 1 2 --out runs/perf/model_parallel_softmax.json

For every (classes C, per-rank batch B, embedding D, world size W) it measures, in fresh
processes, one training step (forward, backward, SGD-with-momentum update of the head) of

- ``plain``: one process holding all C centres, ``F.linear`` over all classes for the global
  batch N = B·W, then cross-entropy with the ArcFace margin (the single-device baseline);
- ``model_parallel``: W processes (gloo on CPU, NCCL on GPUs), each holding C/W centres, as
  :class:`~lightning_modules.distributed.model_parallel_softmax.ModelParallelSoftmax` computes it;
- ``partial_fc``: the same with ``--sample-rate`` (when < 1).

and prints a table of median step time and peak memory per rank, with the ratio to ``plain``
measured in the same run; the JSON has every number. On CPU the memory is the peak resident
set of each process (including torch itself, reported once as ``baseline``); on GPU it is
``torch.cuda.max_memory_allocated``.

Memory per rank (fp32, SGD with momentum), N = B·W the global batch:

- parameters, gradient, momentum of the centres: 3 · (C/W) · D · 4 bytes;
- logits and their temporaries over this rank's classes: k · N · (C/W) · 4 bytes, k the number
  of [N, C/W] tensors alive at once (cosines, margin logits, exponentials, their gradients);
  never N · C on one rank;
- embeddings gathered from all ranks: N · D · 4 bytes.

Communication per step and rank: the all-gather of embeddings (N·D floats) and labels (N), two
all-reduces of N floats for the normaliser (max, sum of exponentials) and one for the target
logit, the head's statistics (N or 2N floats), and in backward the reduce-scatter of the
gathered embeddings' gradient (N·D floats in, N·D/W out per rank: half an all-reduce's traffic).
Independent of C: the class dimension never travels.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

from lightning_modules.distributed.model_parallel_softmax import ModelParallelSoftmax
from lightning_modules.nn.margins import CombinedMarginHead


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time_steps(step, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps + 1):  # the first step warms up and is dropped
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def _plain_step_fn(classes: int, batch: int, dim: int, device: torch.device):
    head = CombinedMarginHead()
    weight = torch.nn.Parameter(torch.randn(classes, dim, device=device) * 0.01)
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    embeddings = torch.randn(batch, dim, device=device, requires_grad=True)
    labels = torch.randint(classes, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        cos = F.linear(F.normalize(embeddings), F.normalize(weight))
        F.cross_entropy(head(cos, labels), labels).backward()
        optimizer.step()

    return step


def _model_parallel_step_fn(classes: int, batch: int, dim: int, sample_rate: float, device: torch.device):
    softmax = ModelParallelSoftmax(classes, dim, CombinedMarginHead(), sample_rate=sample_rate).to(device)
    optimizer = torch.optim.SGD(softmax.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator(device=device).manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    embeddings = torch.randn(batch, dim, device=device, generator=generator, requires_grad=True)
    labels = torch.randint(classes, (batch,), device=device, generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        softmax(embeddings, labels).backward()
        optimizer.step()

    return step


def _worker(rank: int, world_size: int, port: int, case: dict, out: str) -> None:
    """One process of one measurement; writes its times and peak memory to ``out``.rank."""
    use_cuda = case["device"] == "cuda"
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    torch.set_num_threads(max(1, case["threads"] // world_size))
    if case["kind"] != "plain":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    try:
        if case["kind"] == "plain":
            step = _plain_step_fn(case["classes"], case["batch"] * case["world_size"], case["dim"], device)
        else:
            step = _model_parallel_step_fn(case["classes"], case["batch"], case["dim"], case["sample_rate"], device)
        result = {"times": _time_steps(step, case["steps"], device), "peak_memory": _peak_memory_bytes(device)}
    except torch.OutOfMemoryError:
        result = {"times": None, "peak_memory": None, "error": "out of memory"}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def _baseline_worker(rank: int, out: str) -> None:
    torch.zeros(1)
    Path(f"{out}.{rank}").write_text(json.dumps({"peak_memory": _peak_memory_bytes(torch.device("cpu"))}))


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


def _format_table(rows: list[dict], baseline_memory: int | None) -> str:
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
        memory = r["peak_memory_bytes"] - (baseline_memory or 0)
        ref_memory = None if ref is None or ref.get("error") else ref["peak_memory_bytes"] - (baseline_memory or 0)
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
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/perf/model_parallel_softmax.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and max(args.world_sizes) > torch.cuda.device_count():
        parser.error(f"--world-sizes {max(args.world_sizes)} needs as many GPUs; {torch.cuda.device_count()} found")

    kinds = ["plain", "model_parallel"] + (["partial_fc"] if args.sample_rate < 1 else [])
    rows = []
    for classes in args.classes:
        for world_size in args.world_sizes:
            for kind in kinds:
                case = {
                    "kind": kind, "classes": classes, "batch": args.batch, "dim": args.dim, "world_size": world_size,
                    "sample_rate": args.sample_rate if kind == "partial_fc" else 1.0, "steps": args.steps,
                    "device": args.device, "threads": torch.get_num_threads(),
                }
                rows.append(measure(case))
                print(f"measured {kind} C={classes} W={world_size}", file=sys.stderr)
    baseline = None
    if args.device == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_baseline_worker, args=(os.path.join(tmp, "b"),), nprocs=1, start_method="spawn")
            baseline = json.loads(Path(os.path.join(tmp, "b.0")).read_text())["peak_memory"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "baseline_process_memory_bytes": baseline, "rows": rows}, indent=2))
    print(_format_table(rows, baseline))
    print(f"\nwritten to {args.out}" + (f"; CPU memory excludes {baseline / 2**20:.0f} MiB of process baseline" if baseline else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
