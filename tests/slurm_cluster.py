"""Helpers for tests that submit jobs to a real SLURM cluster (not a test module).

The cluster is the one-node localhost cluster of ``benchmarks/slurm/local_cluster.sh``.
Tests import this module as ``slurm_cluster`` (``tests/`` is on ``sys.path`` through its
``conftest.py``) and skip when :func:`slurm_available` is false::

    ensure_cluster()
    if not slurm_available():
        pytest.skip("no SLURM cluster (set VISIONZOO_START_SLURM=1 to start one)")
    job = submit("srun hostname", tmp_path, "--ntasks-per-node", "2")
    assert wait_for(job, {"COMPLETED"}, timeout=60) == "COMPLETED"

Without accounting (no slurmdbd, the local cluster's case) a finished job stays visible to
``scontrol show job`` for ``MinJobAge`` seconds (600 in the local cluster).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO / "benchmarks" / "slurm" / "local_cluster.sh"

#: States after which a job does not change any more (unless it is requeued by hand).
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)


def _run(args: Sequence[str], timeout: float = 10.0, cwd: Path | None = None) -> subprocess.CompletedProcess[str] | None:
    """Run a command and capture its output; None when it is missing or hangs."""
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def slurm_available(timeout: float = 5.0) -> bool:
    """True when ``sinfo`` answers within ``timeout`` seconds and lists a partition that is up."""
    if shutil.which("sinfo") is None:
        return False
    result = _run(["sinfo", "-h", "-o", "%a"], timeout=timeout)
    return result is not None and result.returncode == 0 and "up" in result.stdout.split()


def ensure_cluster(timeout: float = 900.0) -> None:
    """Start the local cluster when none answers and ``VISIONZOO_START_SLURM=1`` or ``CI=true``.

    Does nothing otherwise. Raises RuntimeError with the script's output when starting fails.
    """
    if slurm_available():
        return
    allowed = os.environ.get("VISIONZOO_START_SLURM") == "1" or os.environ.get("CI", "").lower() == "true"
    if not allowed:
        return
    try:
        result = subprocess.run(
            ["bash", str(START_SCRIPT), "start"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"{START_SCRIPT} start did not finish in {timeout:.0f} s") from error
    if result.returncode != 0 or not slurm_available():
        output = (result.stdout + result.stderr)[-4000:]
        raise RuntimeError(f"{START_SCRIPT} start failed (exit {result.returncode}):\n{output}")


def submit(script_text: str, cwd: Path, *sbatch_args: str) -> int:
    """Write ``script_text`` to a batch script in ``cwd``, ``sbatch`` it from there, return the job id.

    A ``#!/bin/bash`` line is added when the text has no shebang; ``sbatch_args`` come before
    the script (e.g. ``"--ntasks-per-node", "2"``), and ``#SBATCH`` lines in the text work too.
    """
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    if not script_text.startswith("#!"):
        script_text = "#!/bin/bash\n" + script_text
    with tempfile.NamedTemporaryFile("w", dir=cwd, prefix="job-", suffix=".sbatch", delete=False) as handle:
        handle.write(script_text)
    script = Path(handle.name)
    script.chmod(0o755)
    result = _run(["sbatch", "--parsable", *sbatch_args, str(script)], timeout=30.0, cwd=cwd)
    if result is None or result.returncode != 0:
        detail = "sbatch is missing or hung" if result is None else result.stderr.strip()
        raise RuntimeError(f"sbatch {' '.join(sbatch_args)} {script} failed: {detail}")
    # --parsable prints "<job id>" or "<job id>;<cluster>".
    return int(result.stdout.strip().split(";")[0])


@functools.lru_cache(maxsize=1)
def _accounting_available() -> bool:
    """True when ``sacct`` works (slurmdbd configured); the local cluster has none."""
    if shutil.which("sacct") is None:
        return False
    result = _run(["sacct", "-n", "-X", "-o", "JobID", "-S", "now"], timeout=10.0)
    return result is not None and result.returncode == 0


def job_state(job_id: int) -> str | None:
    """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``, ...), None when SLURM does not know it.

    ``scontrol show job`` answers for live jobs and for finished ones during ``MinJobAge``;
    ``sacct`` is asked afterwards when accounting is configured.
    """
    result = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if result is not None and result.returncode == 0:
        match = re.search(r"\bJobState=(\S+)", result.stdout)
        if match:
            return match.group(1)
    if _accounting_available():
        result = _run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)])
        if result is not None and result.returncode == 0 and result.stdout.strip():
            # e.g. "CANCELLED by 1000"; the last line is the newest run of a requeued job.
            return result.stdout.strip().splitlines()[-1].split()[0]
    return None


def wait_for(job_id: int, states: Iterable[str] | str, timeout: float = 120.0, poll: float = 1.0) -> str:
    """Poll until the job is in one of ``states`` or in a terminal state; return that state.

    Raises TimeoutError (with the last state seen) after ``timeout`` seconds.
    """
    wanted = {states.upper()} if isinstance(states, str) else {state.upper() for state in states}
    deadline = time.monotonic() + timeout
    state: str | None = None
    while True:
        state = job_state(job_id)
        if state is not None and (state in wanted or state in TERMINAL_STATES):
            return state
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout:.0f} s (last state: {state})")
        time.sleep(poll)
