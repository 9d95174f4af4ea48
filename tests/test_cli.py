"""The ``visionzoo`` command line: every config parses and instantiates, errors are clear,
and an MVTec run of MSFlow on the mini set learns, writes its results, pictures and logs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import leaderboard
from lightning_modules.cli import VisionZooCLI

from conftest import CONFIGS, REPO

MINI_PRESET = "mini.yaml"
# Methods whose mini preset is not their benchmark's mini.yaml (the zero-shot DAVIS methods read
# flow; BEBR trains a binarizer with Adam, not a network with SGD).
OWN_PRESETS = {"davis/hfan_mitb1": "mini_zero_shot.yaml", "davis/hcpn": "mini_frame_pairs.yaml",
               "davis/hgpu": "mini_frame_pairs.yaml", "gldv2/bebr": "mini_binary.yaml"}
PRESETS = {MINI_PRESET, *OWN_PRESETS.values()}
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
METHOD_CONFIGS = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "trainer" and p.name not in PRESETS)
# Recipe variants (configs/<benchmark>/variants/), stacked on the method configs they name.
VARIANTS = {CONFIGS / "ms1m/variants/arcface_torch_2022.yaml": [CONFIGS / "ms1m/arcface_r50.yaml", CONFIGS / "ms1m/cosface_r50.yaml"]}


def _cli(*args: str) -> VisionZooCLI:
    return VisionZooCLI(args=list(args), run=False)


def mini_preset(config: Path) -> Path:
    return config.with_name(OWN_PRESETS.get(f"{config.parent.name}/{config.stem}", MINI_PRESET))


def _mini_args(config: Path, mini_root: Path) -> list[str]:
    args = ["--config", str(config), "--config", str(mini_preset(config)), "--data.init_args.root", str(mini_root)]
    if mini_preset(config).name in ("mini_zero_shot.yaml", "mini_frame_pairs.yaml"):
        args += ["--data.init_args.flow_root", str(mini_root / "FlowImages/480p")]
    return args


def test_every_yaml_is_covered():
    covered = set(TRAINER_PRESETS) | set(METHOD_CONFIGS) | {mini_preset(c) for c in METHOD_CONFIGS} | set(VARIANTS)
    assert set(CONFIGS.rglob("*.yaml")) == covered


@pytest.mark.parametrize("variant, base", [(v, b) for v, bases in VARIANTS.items() for b in bases],
                         ids=lambda p: p.stem)
def test_a_recipe_variant_stacks_on_its_method_configs(variant, base, mini_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli("--config", str(base), "--config", str(variant), "--data.init_args.root", str(mini_data / "ms1m"),
               "--config", str(CONFIGS / "trainer/cpu.yaml"))
    expected = yaml.safe_load(variant.read_text())
    assert cli.model.recipe.lr == expected["model"]["init_args"]["optim"]["lr"]
    assert cli.model.recipe.power == expected["model"]["init_args"]["optim"]["power"]
    assert cli.model.head.margin_gradient == expected["model"]["init_args"]["head"]["init_args"]["margin_gradient"]
    assert cli.trainer.max_epochs == expected["trainer"]["max_epochs"]


NEEDS_OLD_MODEL = {"gldv2/bct_r50", "gldv2/ract_r50", "gldv2/advbct_r18", "gldv2/unibct_r50", "gldv2/dmu_r50", "gldv2/bict_r50",
                   "gldv2/bebr"}


def _instantiation_args(config: Path, mini_data: Path) -> list[str]:
    """The config with its mini preset; the ROxford test config (no preset: it only tests) on the
    mini ROxford5k; the compatible upgrades with an old model of one training step."""
    name = f"{config.parent.name}/{config.stem}"
    if name == "gldv2/revisited_eval":
        return ["--config", str(config), "--data.init_args.root", str(mini_data / "revisited"),
                "--model.init_args.backbone", "test_resnet", "--model.init_args.embedding_size", "64"]
    args = _mini_args(config, mini_data / config.parent.name)
    if name in NEEDS_OLD_MODEL:
        old = VisionZooCLI(args=["fit", *_mini_args(CONFIGS / "gldv2/baseline_r50.yaml", mini_data / "gldv2"), "--config",
                                 str(CONFIGS / "trainer/cpu.yaml"), "--trainer.max_steps", "1", "--run_name", "old"])
        checkpoint = str(Path(old.trainer.default_root_dir) / "checkpoints/last.ckpt")
        if name == "gldv2/bebr":  # the float model it binarizes
            args += ["--model.init_args.float_checkpoint", checkpoint]
        else:
            args += ["--model.init_args.old_checkpoint", checkpoint]
        if name == "gldv2/bict_r50":  # and the new model of the backward-compatible stage
            args += ["--model.init_args.new_checkpoint", checkpoint]
    return args


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_method_config_instantiates_with_its_mini_preset(config, mini_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli(*_instantiation_args(config, mini_data), "--config", str(CONFIGS / "trainer/cpu.yaml"))
    assert cli.model is not None and cli.datamodule is not None
    assert Path(cli.trainer.default_root_dir) == Path("runs") / cli.datamodule.benchmark / cli.model.method_name / cli.datamodule.run_name


# Whether the configs of a benchmark start from timm's ImageNet weights (MVTec: frozen ImageNet
# backbones, as the papers; face recognition and video from scratch; SeCo's paper starts from
# MoCo-v2's ImageNet weights, which timm does not serve: its config takes them as
# model.weights, and without them starts from random weights, saying so).
# GLDv2 starts from ImageNet weights (RACT, the GLDv2 recipes); its ROxford test config loads a checkpoint,
# BEBR the float model it binarizes and the forward transformation (bict_r50) the frozen new model.
# DAVIS (STM, LCM, HFAN) and MOT17 (FairMOT's DLA-34) start from ImageNet weights.
PAPERS_USE_PRETRAINED = {"mvtec": True, "mvtec_adbench": True, "ms1m": False, "ucf101": False, "gldv2": True,
                         "gldv2/revisited_eval": False, "gldv2/bebr": False, "gldv2/bict_r50": False, "davis": True, "mot17": True}


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_config_uses_the_papers_weights_and_mini_needs_no_network(config):
    expected = PAPERS_USE_PRETRAINED.get(f"{config.parent.name}/{config.stem}", PAPERS_USE_PRETRAINED[config.parent.name])

    def pretrained(path: Path) -> bool:  # the backbone is the model's, or the data's (ADBench's features)
        content = yaml.safe_load(path.read_text())
        model, data = (content.get(key, {}).get("init_args", {}) for key in ("model", "data"))
        return model.get("pretrained", data.get("pretrained"))

    assert pretrained(config) is expected
    assert pretrained(mini_preset(config)) is False


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.stem)
def test_trainer_preset_instantiates(preset, mini_mvtec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if preset.stem == "slurm":  # SLURMEnvironment reads the job's variables: pose as task 0 of a job
        for name, value in {"SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "visionzoo", "SLURM_NTASKS": "1", "SLURM_NODEID": "0",
                            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost"}.items():
            monkeypatch.setenv(name, value)
    # GPU presets are instantiated on the CPU here: same keys, accelerator overridden.
    cli = _cli(*_mini_args(CONFIGS / "mvtec/msflow.yaml", mini_mvtec), "--config", str(preset),
               "--trainer.accelerator", "cpu", "--trainer.devices", "1")
    expected = yaml.safe_load(preset.read_text())["trainer"]
    if "precision" in expected:
        assert cli.trainer.precision == expected["precision"]


def test_wrong_config_key_is_a_parse_error(mini_mvtec, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli(*_mini_args(CONFIGS / "mvtec/msflow.yaml", mini_mvtec), "--model.init_args.number_of_flows", "3")
    assert exit_info.value.code != 0
    assert "number_of_flows" in capsys.readouterr().err


def test_wrong_key_inside_a_yaml_is_a_parse_error(mini_mvtec, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    categroy: weave\n")
    with pytest.raises(SystemExit):
        _cli(*_mini_args(CONFIGS / "mvtec/msflow.yaml", mini_mvtec), "--config", str(bad))
    assert "categroy" in capsys.readouterr().err


def test_unreachable_pretrained_weights_name_both_ways_out(tmp_path):
    script = "from lightning_modules.nn.backbones import create_backbone; create_backbone('resnet18', pretrained=True)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "--model.weights PATH" in result.stderr and "--model.pretrained false" in result.stderr


def test_local_weights_file_is_loaded(tmp_path):
    import timm
    import torch

    from lightning_modules.nn.backbones import create_backbone

    reference = timm.create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    loaded = create_backbone("resnet18", pretrained=False, weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_backbone("resnet18", pretrained=False, weights=str(tmp_path / "missing.pth"))


@pytest.mark.slow
def test_msflow_learns_the_mini_set_end_to_end(mini_mvtec, tmp_path, monkeypatch):
    """fit + test through the CLI: image and pixel AUROC well above chance (0.5), and every
    artefact of a run (metrics.csv, config.yaml, last.ckpt, results.json, pictures, the official
    TIFF maps, leaderboard)."""
    monkeypatch.chdir(tmp_path)
    args = [*_mini_args(CONFIGS / "mvtec/msflow.yaml", mini_mvtec), "--config", str(CONFIGS / "trainer/cpu.yaml")]
    VisionZooCLI(args=["fit", *args])
    VisionZooCLI(args=["test", *args, "--ckpt_path", "last"])

    run = tmp_path / "runs" / "mvtec" / "msflow" / "weave"
    results = json.loads((run / "results.json").read_text())
    assert results["benchmark"] == "mvtec" and results["method"] == "msflow"
    assert results["dataset"]["category"] == "weave"
    assert results["checkpoint"].endswith("last.ckpt") and results["skipped_corrupt"] == 0
    assert results["config"]["model"]["init_args"]["backbone"] == "resnet18"
    metrics = results["metrics"]
    assert metrics["image_auroc"] >= 0.9, metrics
    assert metrics["pixel_auroc"] >= 0.9, metrics
    assert 0.5 < metrics["aupro"] <= 1.0, metrics

    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    with open(run / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    assert any(row.get("train/loss") for row in logged)
    assert any(row.get("throughput/samples_per_sec") for row in logged)
    pictures = sorted((run / "anomaly_maps").glob("*.png"))
    assert {p.name.split("_")[0] for p in pictures} >= {"good", "hole", "scratch", "stain"}

    # The official-format TIFF maps read back are the maps scored: the offline scorer reproduces
    # the localisation map's metrics of results.json.
    from benchmarks.metrics import mvtec

    mvtec.main([str(mini_mvtec), str(run / "mvtec_anomaly_maps"), "--out", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())["weave"]
    assert scores["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"], abs=1e-12)
    assert scores["image_auroc"] == pytest.approx(metrics["image_auroc_max"], abs=1e-12)
    assert 0.5 < scores["aupro"] <= 1.0

    tables = leaderboard.leaderboard_rows(leaderboard.collect_results(tmp_path / "runs"), {})
    names, rows = tables["mvtec"]
    assert rows[0][:2] == ["msflow", "weave"]
    assert rows[0][2 + names.index("image_auroc")] == f"{100 * metrics['image_auroc']:.2f}"

    # The paper's protocol: at the input resolution (here also the ground truth's: 128 px), AU-PRO
    # by the authors' 800-threshold sweep, named apart from the official AU-PRO.
    VisionZooCLI(args=["test", *args, "--ckpt_path", "last", "--model.init_args.evaluation_protocol", "authors"])
    authors = json.loads((run / "results.json").read_text())["metrics"]
    assert "aupro" not in authors and 0.5 < authors["aupro_sweep800"] <= 1.0
    assert authors["aupro_sweep800"] != pytest.approx(metrics["aupro"], abs=1e-6)
    for same in ("image_auroc", "image_auroc_max", "pixel_auroc"):
        assert authors[same] == pytest.approx(metrics[same], abs=1e-12)


def test_run_directory_overrides(mini_mvtec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = _mini_args(CONFIGS / "mvtec/msflow.yaml", mini_mvtec)
    assert Path(_cli(*base, "--run_name", "ablation").trainer.default_root_dir) == Path("runs/mvtec/msflow/ablation")
    explicit = tmp_path / "elsewhere"
    assert Path(_cli(*base, "--trainer.default_root_dir", str(explicit)).trainer.default_root_dir) == explicit


def test_metrics_csv_is_appended_not_replaced(tmp_path):
    from callbacks.run_log import RunCSVLogger

    first = RunCSVLogger(str(tmp_path))
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    second = RunCSVLogger(str(tmp_path))  # a later command in the same run directory
    second.log_metrics({"test/aupro": 0.5}, step=0)
    second.save()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["train/loss"] for r in rows] == ["1.0", ""]
    assert [r["test/aupro"] for r in rows] == ["", "0.5"]


def _tiny_mvtec(tmp_path: Path) -> list[str]:
    from datamodules.mini.mvtec import write_mvtec

    write_mvtec(tmp_path / "mvtec", categories=["weave"], n_train=4, n_test_good=2, n_test_per_defect=1, seed=0)
    return [*_mini_args(CONFIGS / "mvtec/msflow.yaml", tmp_path / "mvtec"), "--config", str(CONFIGS / "trainer/cpu.yaml"),
            "--data.init_args.image_size", "64"]


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_evaluating_last_with_no_checkpoint_is_an_error_naming_the_run_directory(subcommand, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _tiny_mvtec(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path last: no checkpoint in the run directory runs/mvtec/msflow/weave"):
        VisionZooCLI(args=[subcommand, *args, "--ckpt_path", "last"])
    with pytest.raises(ValueError, match=f"visionzoo {subcommand} of msflow needs the weights to evaluate"):
        VisionZooCLI(args=[subcommand, *args])
    assert not list(tmp_path.rglob("results.json"))


def test_an_explicitly_untrained_test_is_marked_in_results_and_leaderboard(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    VisionZooCLI(args=["test", *_tiny_mvtec(tmp_path), "--ckpt_path", "none"])
    results = json.loads(Path("runs/mvtec/msflow/weave/results.json").read_text())
    assert results["checkpoint"] is None and results["untrained"] is True
    tables = leaderboard.leaderboard_rows(leaderboard.collect_results(Path("runs")), {})
    assert [row[1] for row in tables["mvtec"][1]] == ["weave (untrained)"]


def test_each_command_keeps_its_own_config_and_the_fits_stays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _tiny_mvtec(tmp_path)
    VisionZooCLI(args=["fit", *args, "--trainer.max_steps", "1"])
    run = Path("runs/mvtec/msflow/weave")
    fit_files = {name: (run / name).read_text() for name in ("config.yaml", "hparams.yaml")}
    VisionZooCLI(args=["test", *args, "--ckpt_path", "last", "--model.init_args.top_k", "0.5"])
    assert {name: (run / name).read_text() for name in fit_files} == fit_files
    assert yaml.safe_load((run / "config.test.yaml").read_text())["model"]["init_args"]["top_k"] == 0.5
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["top_k"] == 0.03
    assert (run / "hparams.test.yaml").is_file()


def test_a_fresh_fit_into_a_used_run_directory_is_refused_unless_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*_tiny_mvtec(tmp_path), "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1"]
    VisionZooCLI(args=["fit", *args])
    run = Path("runs/mvtec/msflow/weave")
    before = (run / "metrics.csv").read_text()
    with pytest.raises(FileExistsError, match=r"runs/mvtec/msflow/weave already holds a run \(checkpoints/last.ckpt\): "
                                              r"resume it with --ckpt_path last, .*--run_name NAME.*--overwrite"):
        VisionZooCLI(args=["fit", *args])
    assert (run / "metrics.csv").read_text() == before
    VisionZooCLI(args=["fit", *args, "--run_name", "second"])  # a separate run beside it
    VisionZooCLI(args=["fit", *args, "--overwrite", "true"])
    steps = [row["step"] for row in csv.DictReader((run / "metrics.csv").open()) if row.get("train/loss")]
    assert steps == ["0", "1"]  # the replaced run's rows are gone, not mixed with the new ones


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_save_a_checkpoint_and_exit_non_zero(signal_name, tmp_path):
    import signal

    from runner import visionzoo

    injection = tmp_path / "signal.yaml"
    injection.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "tests.fault_injection.SignalAtStep", "init_args": {"global_step": 2, "signal_name": signal_name}}]}}))
    result = visionzoo("fit", *_tiny_mvtec(tmp_path), "--config", str(injection), "--data.init_args.batch_size", "1",
                       "--trainer.default_root_dir", "run", cwd=tmp_path, check=False)
    assert result.returncode == 128 + signal.Signals[signal_name], result.stderr[-2000:]
    assert f"stopped by {signal_name} at global step 3" in result.stdout + result.stderr
    assert (tmp_path / "run/hpc_ckpt_1.ckpt").is_file()
    resumed = visionzoo("fit", *_tiny_mvtec(tmp_path), "--data.init_args.batch_size", "1", "--trainer.max_steps", "4",
                        "--trainer.default_root_dir", "run", "--ckpt_path", "last", cwd=tmp_path)
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr


def test_last_checkpoint_is_written_every_n_steps_without_validation(tmp_path):
    """Killed at step 3 of a run that has not validated yet: step 2's checkpoint is there."""
    from runner import visionzoo

    injection = tmp_path / "kill.yaml"
    injection.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "tests.fault_injection.SignalAtStep", "init_args": {"global_step": 3, "signal_name": "SIGKILL"}}]}}))
    for every, run in ((2, "with"), (0, "without")):
        visionzoo("fit", *_tiny_mvtec(tmp_path), "--config", str(injection), "--data.init_args.batch_size", "1",
                  "--checkpoint_every_n_steps", str(every), "--trainer.default_root_dir", run, cwd=tmp_path, check=False)
    import torch

    assert torch.load(tmp_path / "with/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    assert not (tmp_path / "without/checkpoints").exists()


def test_an_explicit_checkpoint_keeps_the_command_lines_options_and_another_methods_is_refused(
        mini_ms1m, tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.chdir(tmp_path)
    args = _tiny_mvtec(tmp_path)
    VisionZooCLI(args=["fit", *args, "--trainer.max_steps", "1"])
    checkpoint = str(Path("runs/mvtec/msflow/weave/checkpoints/last.ckpt").resolve())
    with caplog.at_level(logging.INFO):
        cli = VisionZooCLI(args=["test", *args, "--ckpt_path", checkpoint, "--model.init_args.top_k", "0.5"])
    assert cli.model.hparams.top_k == 0.5  # Lightning merged the checkpoint's 0.03 over the command line
    assert "top_k 0.5 (checkpoint: 0.03)" in caplog.text
    results = json.loads(Path("runs/mvtec/msflow/weave/results.json").read_text())
    assert results["config"]["model"]["init_args"]["top_k"] == 0.5
    face = [*_mini_args(CONFIGS / "ms1m/arcface_r50.yaml", mini_ms1m), "--config", str(CONFIGS / "trainer/cpu.yaml")]
    with pytest.raises(ValueError, match=r"was written by a run of lightning_modules.anomaly.msflow.MSFlow, but this "
                                         r"run's model is lightning_modules.face.recognizer.MarginSoftmaxRecognizer"):
        VisionZooCLI(args=["test", *face, "--ckpt_path", checkpoint])


def test_a_run_prints_no_framework_noise_and_counts_epochs_as_lightning_does(tmp_path):
    from runner import visionzoo

    result = visionzoo("fit", *_tiny_mvtec(tmp_path), "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
                       "--trainer.default_root_dir", "run", cwd=tmp_path)
    output = result.stdout + result.stderr
    for noise in ("💡 Tip", "`srun` command is available", "LeafSpec", "in eval mode at the start of training"):
        assert noise not in output, noise
    assert "epoch 0/1 batch 1/" in output and "epoch 1/1 batch" in output  # 0-based, as the Rich bar and metrics.csv
    assert "epoch 2/" not in output


def test_restart_lr_schedule_resumes_with_the_configs_learning_rate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*_tiny_mvtec(tmp_path), "--data.init_args.batch_size", "1", "--checkpoint_every_n_steps", "2",
            "--model.init_args.optim.warmup_epochs", "0"]
    VisionZooCLI(args=["fit", *args, "--trainer.max_steps", "2"])
    plain = VisionZooCLI(args=["fit", *args, "--trainer.max_steps", "3", "--ckpt_path", "last",
                               "--model.init_args.optim.lr", "1e-5"])
    assert plain.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1e-3)  # the checkpoint's
    resumed = VisionZooCLI(args=["fit", *args, "--trainer.max_steps", "4", "--ckpt_path", "last",
                                 "--model.init_args.optim.lr", "1e-5", "--restart_lr_schedule", "true"])
    assert resumed.trainer.global_step == 4
    assert resumed.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1e-5)
