"""visionzoo on a real SLURM (the localhost cluster of benchmarks/slurm/local_cluster.sh): the
sbatch template trains a mini config with 2 tasks (gloo) to the end, and a job sent SIGUSR1
mid-training saves an hpc checkpoint, requeues itself and finishes in the same run directory
with the same steps and the same weights as the uninterrupted job."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, REPO
from runner import assert_same_weights, final_weights
from slurm_cluster import ensure_cluster, job_state, slurm_available, wait_for

TEMPLATE = REPO / "benchmarks/slurm/train.sbatch"
MAX_EPOCHS = 12


@pytest.fixture(scope="module")
def cluster() -> None:
    ensure_cluster()
    if not slurm_available():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the SLURM tests, but no SLURM answers `sinfo` (.ci/run starts one)")
        pytest.skip("no SLURM answers `sinfo` (CI starts one; locally: bash benchmarks/slurm/local_cluster.sh start)")


def _sbatch(run_dir: Path, mini_mvtec: Path) -> int:
    """The repository's template, sized for this CPU machine: 2 tasks, no GPUs."""
    command = [
        "sbatch", "--parsable", "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1",
        "--time", "20", "--chdir", str(REPO), "--output", str(run_dir / "job-%j.out"), str(TEMPLATE),
        str(CONFIGS / "mvtec/msflow.yaml"), "--config", str(CONFIGS / "mvtec/mini.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.log_every_n_steps", "1",
        "--trainer.max_epochs", str(MAX_EPOCHS), "--data.init_args.root", str(mini_mvtec),
        "--trainer.default_root_dir", str(run_dir / "run"),
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return int(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout.strip().split(";")[0])


def _trained_steps(run: Path) -> list[int]:
    """The logged training steps in file order (a repeated step would show twice)."""
    with open(run / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _job_output(run_dir: Path, job: int) -> str:
    return (run_dir / f"job-{job}.out").read_text()


@pytest.fixture(scope="module")
def uninterrupted_job(cluster, mini_mvtec, tmp_path_factory) -> tuple[Path, str]:
    """The run directory and ``.out`` of a job that trains to the end without interruption."""
    job_dir = tmp_path_factory.mktemp("uninterrupted_job")
    job = _sbatch(job_dir, mini_mvtec)
    state = wait_for(job, {"COMPLETED"}, timeout=600)
    output = _job_output(job_dir, job)
    assert state == "COMPLETED", output[-3000:]
    return job_dir / "run", output


@pytest.mark.slow
def test_two_task_job_trains_to_the_end(uninterrupted_job):
    run, output = uninterrupted_job
    assert "`Trainer.fit` stopped: `max_epochs=12` reached." in output
    steps = _trained_steps(run)
    assert steps[-1] == MAX_EPOCHS * 3 - 1  # 48 training images / (2 ranks x batch 8) = 3 steps an epoch


@pytest.mark.slow
def test_sigusr1_requeues_and_the_job_finishes_in_the_same_run_directory(uninterrupted_job, mini_mvtec, tmp_path):
    job = _sbatch(tmp_path, mini_mvtec)
    run = tmp_path / "run"
    deadline = time.monotonic() + 300
    while not (run / "metrics.csv").is_file() or len(_trained_steps(run)) < 6:  # mid-training
        assert time.monotonic() < deadline and job_state(job) in {"PENDING", "RUNNING", "CONFIGURING"}, job_state(job)
        time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", str(job)], check=True)
    assert wait_for(job, {"COMPLETED"}, timeout=600) == "COMPLETED", _job_output(tmp_path, job)[-3000:]

    output = _job_output(tmp_path, job)
    assert "SIGUSR1 received: saving" in output and "requeued SLURM job" in output
    assert re.search(r"Restoring states from the checkpoint path at .*hpc_ckpt_1\.ckpt", output), output[-3000:]
    assert list(run.glob("hpc_ckpt_*.ckpt"))
    assert _trained_steps(run) == _trained_steps(uninterrupted_job[0])  # every step once, none missing
    assert_same_weights(final_weights(run), final_weights(uninterrupted_job[0]))
