"""Shared fixtures: the repository root and the mini datasets, written once per test session
under one folder (``<mini>/<benchmark>``), as the mini presets expect."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    from datamodules.mini.adbench import write_adbench
    from datamodules.mini.davis import write_davis, write_image_masks, write_youtube_vos
    from datamodules.mini.landmarks import write_gldv2, write_revisited
    from datamodules.mini.ms1m import write_ms1m
    from datamodules.mini.mot17 import write_mot17
    from datamodules.mini.mvtec import write_mvtec
    from datamodules.mini.ucf101 import write_ucf101

    root = tmp_path_factory.mktemp("mini")
    write_mvtec(root / "mvtec", seed=0)
    write_ms1m(root / "ms1m", seed=0)
    write_ucf101(root / "ucf101", seed=0)
    write_adbench(root / "mvtec_adbench", seed=0)
    write_gldv2(root / "gldv2", seed=0)
    write_revisited(root / "revisited", seed=0)
    write_davis(root / "davis", seed=0)
    write_youtube_vos(root / "youtube_vos", seed=0)
    write_image_masks(root / "vos_images", seed=0)
    write_mot17(root / "mot17", seed=0)
    return root


@pytest.fixture(scope="session")
def mini_davis(mini_data) -> Path:
    return mini_data / "davis"


@pytest.fixture(scope="session")
def mini_mot17(mini_data) -> Path:
    return mini_data / "mot17"


@pytest.fixture(scope="session")
def mini_gldv2(mini_data) -> Path:
    return mini_data / "gldv2"


@pytest.fixture(scope="session")
def mini_revisited(mini_data) -> Path:
    return mini_data / "revisited"


@pytest.fixture(scope="session")
def mini_mvtec(mini_data) -> Path:
    return mini_data / "mvtec"


@pytest.fixture(scope="session")
def mini_adbench(mini_data) -> Path:
    return mini_data / "mvtec_adbench"


@pytest.fixture(scope="session")
def mini_ms1m(mini_data) -> Path:
    return mini_data / "ms1m"


@pytest.fixture(scope="session")
def mini_ucf101(mini_data) -> Path:
    return mini_data / "ucf101"


def mot17_args(method_config: str, root: Path) -> list[str]:
    """The CLI arguments of ``configs/mot17/<method_config>.yaml`` on the mini MOT17 at ``root``, on the CPU."""
    return ["--config", str(CONFIGS / f"mot17/{method_config}.yaml"), "--config", str(CONFIGS / "mot17/mini.yaml"),
            "--config", str(CONFIGS / "trainer/cpu.yaml"), "--data.init_args.root", str(root)]


@pytest.fixture(scope="session")
def trained_mini_fairmot(mini_mot17, tmp_path_factory) -> Path:
    """A FairMOT trained on the mini MOT17's half split through ``visionzoo fit`` (the mini preset,
    20 epochs, about 2 CPU minutes): the folder holding ``runs/mot17/fairmot/val_half``. Shared by
    the learning test and the two-rank evaluation test."""
    import os

    from lightning_modules.cli import VisionZooCLI

    folder = tmp_path_factory.mktemp("fairmot")
    previous = os.getcwd()
    os.chdir(folder)
    try:
        VisionZooCLI(args=["fit", *mot17_args("fairmot_dla34", mini_mot17), "--trainer.limit_val_batches", "0"])
    finally:
        os.chdir(previous)
    return folder


def gldv2_args(method_config: str, root: Path, preset: str = "mini") -> list[str]:
    """A GLDv2 method config with a mini preset on the CPU."""
    return ["--config", str(CONFIGS / f"gldv2/{method_config}.yaml"), "--config", str(CONFIGS / f"gldv2/{preset}.yaml"),
            "--config", str(CONFIGS / "trainer/cpu.yaml"), "--data.init_args.root", str(root)]


@pytest.fixture(scope="session")
def mini_gldv2_old_model(mini_gldv2, tmp_path_factory) -> Path:
    """The old model of the compatible-upgrade tests: the baseline on 40 % of each landmark's
    photos of the mini GLDv2 (RACT's split by data; the mini preset, 25 epochs, about 15 CPU
    seconds). Its ``last.ckpt``."""
    import os

    from lightning_modules.cli import VisionZooCLI

    folder = tmp_path_factory.mktemp("gldv2_old")
    previous = os.getcwd()
    os.chdir(folder)
    try:
        VisionZooCLI(args=["fit", *gldv2_args("baseline_r50", mini_gldv2), "--data.init_args.image_fraction", "0.4",
                           "--run_name", "old"])
    finally:
        os.chdir(previous)
    return folder / "runs/gldv2/arcface/old/checkpoints/last.ckpt"
