"""The training step's own overhead: the MS1M ArcFace step under a raw PyTorch loop, a plain
Lightning loop, and visionzoo's (its default callbacks and run log), in one process on one device.

    python -m benchmarks.perf.training_step --backbone iresnet50 --classes 93431 --batch 128 \
        --precision bf16-mixed --steps 50 --out runs/perf/training_step.json

The model is :class:`~lightning_modules.face.recognizer.MarginSoftmaxRecognizer` with ArcFace's
head (s 64, m 0.5, straight-through margin, ``configs/ms1m/arcface_r50.yaml``) over
``--classes`` class centres; the data are ``--distinct-batches`` random batches of 112×112
images held in pinned memory and cycled (the step's cost does not depend on their content;
no decoding, no collation), so every variant measures the step alone:

- ``raw``: a PyTorch loop: the module's forward and sharded softmax loss under autocast,
  ``backward``, the recipe's backbone gradient clip (5), the recipe's fused SGD over the same
  parameter groups, ``zero_grad``;
- ``lightning``: ``Trainer.fit`` of the same module, with no callbacks, logger, checkpointing,
  progress bar or model summary;
- ``visionzoo``: the same with the callbacks every visionzoo run has
  (:func:`~callbacks.defaults.default_callbacks`: throughput, NaN guard, checkpoint on a
  signal, resume state) and its run log (:class:`~callbacks.run_log.RunCSVLogger`, every
  ``--log-every`` steps);
- ``visionzoo_without_nan_guard``: the same without the NaN guard, whose check turns the loss
  into a Python bool before every backward (a host-device synchronisation on a GPU);
- ``visionzoo_deferred_nan_guard``: the same with the guard checking on the device and looking
  the result up every ``--log-every`` steps (``FiniteLossGuard(check_every_n_steps=...)``: the
  fused optimizer skips a non-finite step itself).

Each variant builds a fresh module from the same seed. The time of a variant is the wall time of
steps ``--warmup`` … ``--warmup + --steps``, the device synchronised once at each end only
(a per-step synchronisation then shows as it does in a run); ms/step, samples/s, and the
overhead against ``lightning`` and ``raw`` of the same run are printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset

from callbacks.defaults import default_callbacks
from callbacks.nan_guard import FiniteLossGuard
from callbacks.run_log import RunCSVLogger
from lightning_modules.face.recognizer import MarginSoftmaxRecognizer
from lightning_modules.framework import silence_framework_noise
from lightning_modules.nn.margins import CombinedMarginHead

VARIANTS = ("raw", "lightning", "visionzoo", "visionzoo_without_nan_guard", "visionzoo_deferred_nan_guard")


class PinnedBatches(Dataset):
    """``count`` distinct batches of random images and labels, whole batches as items (a loader
    with ``batch_size=None`` hands them on without collating), cycled over ``length`` items;
    in pinned memory with ``pin`` (for a GPU)."""

    def __init__(self, count: int, length: int, batch: int, classes: int, pin: bool, size: int = 112) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batches = [{"image": torch.randn(batch, 3, size, size, generator=generator),
                         "label": torch.randint(classes, (batch,), generator=generator)} for _ in range(count)]
        if pin:
            self.batches = [{key: value.pin_memory() for key, value in batch.items()} for batch in self.batches]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index % len(self.batches)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepWindow(Callback):
    """The wall time of training batches ``warmup`` … ``warmup + steps - 1``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.seconds = warmup, steps, 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            _synchronize(pl_module.device)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup + self.steps - 1:
            _synchronize(pl_module.device)
            self.seconds = time.perf_counter() - self._start


def build_module(args: argparse.Namespace) -> MarginSoftmaxRecognizer:
    torch.manual_seed(0)
    return MarginSoftmaxRecognizer(num_classes=args.classes, backbone=args.backbone, embedding_size=args.dim,
                                   head=CombinedMarginHead(s=64.0, m1=1.0, m2=0.5, m3=0.0, margin_gradient="straight_through"))


def raw_loop(module: MarginSoftmaxRecognizer, loader: DataLoader, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds of the timed window of a plain PyTorch loop (module docstring)."""
    module.configure_model()
    module.to(device).train()
    recipe = module.recipe
    optimizer = torch.optim.SGD(module.optimizer_parameter_groups(), lr=recipe.lr, momentum=recipe.momentum, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed" else nullcontext()
    start = 0.0
    for step, batch in enumerate(loader):
        if step == args.warmup:
            _synchronize(device)
            start = time.perf_counter()
        images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        with autocast:
            loss = module.softmax(module(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.backbone.parameters(), recipe.backbone_grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return time.perf_counter() - start


def lightning_loop(module: MarginSoftmaxRecognizer, loader: DataLoader, args: argparse.Namespace, device: torch.device,
                   callbacks: list[Callback], run_dir: Path | None) -> float:
    """Seconds of the timed window of ``Trainer.fit`` with ``callbacks`` (and the run log when
    ``run_dir`` is given)."""
    window = StepWindow(args.warmup, args.steps)
    trainer = Trainer(accelerator=device.type, devices=1, precision=args.precision, max_steps=args.warmup + args.steps,
                      callbacks=[*callbacks, window], logger=RunCSVLogger(str(run_dir)) if run_dir else False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=args.log_every, default_root_dir=str(run_dir or args.run_dir))
    trainer.fit(module, train_dataloaders=loader)
    return window.seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.training_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="iresnet50")
    parser.add_argument("--classes", type=int, default=93431, help="MS1MV3's identities")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16-mixed", choices=["32", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--distinct-batches", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=50, help="the run log's interval (trainer.log_every_n_steps)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/perf/training_step"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    silence_framework_noise()
    device = torch.device(args.device)
    loader = DataLoader(PinnedBatches(args.distinct_batches, args.warmup + args.steps, args.batch, args.classes,
                                      pin=device.type == "cuda"), batch_size=None, shuffle=False)
    def with_guard(guard: FiniteLossGuard | None) -> list[Callback]:
        """visionzoo's default callbacks with ``guard`` in place of its NaN guard."""
        return [c for c in default_callbacks(on_terminal=False) if not isinstance(c, FiniteLossGuard)] + ([guard] if guard else [])

    callbacks: dict[str, list[Callback]] = {
        "lightning": [], "visionzoo": default_callbacks(on_terminal=False), "visionzoo_without_nan_guard": with_guard(None),
        "visionzoo_deferred_nan_guard": with_guard(FiniteLossGuard(check_every_n_steps=args.log_every))}
    def fit_with(variant: str) -> Callable[[MarginSoftmaxRecognizer], float]:
        run_dir = None if variant == "lightning" else args.run_dir / variant
        return lambda module: lightning_loop(module, loader, args, device, callbacks[variant], run_dir)

    runs = {"raw": lambda module: raw_loop(module, loader, args, device), **{variant: fit_with(variant) for variant in callbacks}}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {"device": name, "backbone": args.backbone, "classes": args.classes, "batch": args.batch,
                               "precision": args.precision, "steps": args.steps, "rows": []}
    for variant in args.variants:
        seconds = runs[variant](build_module(args))
        results["rows"].append({"variant": variant, "ms_per_step": 1000 * seconds / args.steps,
                                "samples_per_s": args.batch * args.steps / seconds})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by_variant = {row["variant"]: row["ms_per_step"] for row in results["rows"]}
    print(f"\n{args.backbone}, {args.classes} classes, batch {args.batch}, {args.precision}, {args.steps} steps on {name}")
    print("| variant | ms/step | samples/s | vs lightning | vs raw |\n|---|---|---|---|---|")
    for row in results["rows"]:
        for baseline in ("lightning", "raw"):
            if baseline in by_variant:
                row[f"overhead_vs_{baseline}"] = row["ms_per_step"] / by_variant[baseline] - 1
        print(f"| {row['variant']} | {row['ms_per_step']:.2f} | {row['samples_per_s']:.0f} | "
              + " | ".join(f"{100 * row[key]:+.1f} %" if key in row else "" for key in ("overhead_vs_lightning", "overhead_vs_raw")) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
