"""Two nodes on one machine (two torchrun launches, ``--nnodes 2``, as on two hosts): training
across them equals training on one node with the same number of ranks, and when a rank dies or
hangs the other exits with an error within the DDP timeout instead of hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS
from runner import ENV, assert_same_weights, final_weights, free_port, train_losses, visionzoo

TIMEOUT_S = 20
# One thread per rank in both launches: torchrun sets it, Lightning's own launcher does not,
# and CPU kernels sum in a thread-count-dependent order.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}



def _args(mini_ms1m: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / "ms1m/arcface_r50.yaml"), "--config", str(CONFIGS / "ms1m/mini.yaml"),
            "--config", str(CONFIGS / "trainer/ddp.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true", "--data.init_args.root", str(mini_ms1m), "--trainer.max_epochs", "1",
            "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", "run", *extra]


def _launch_two_nodes(args: list[str], cwd: Path) -> list[subprocess.Popen]:
    """One ``torchrun --nnodes 2 --nproc_per_node 1`` per node, each in its own session (so that
    a test can kill a node with everything it started), output in ``cwd/node<i>.log``."""
    port = free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    nodes = []
    for node in (0, 1):
        command = [str(torchrun), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                   "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lightning_modules.cli", "fit",
                   *args, "--trainer.num_nodes", "2", "--trainer.devices", "1"]
        log = open(cwd / f"node{node}.log", "w")
        nodes.append(subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**ENV, **ONE_THREAD}, start_new_session=True))
    return nodes


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc: torchrun starts its workers in sessions
    of their own, so killing its process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, frontier = [], [pid]
    while frontier:
        tree.append(current := frontier.pop())
        frontier += children.get(current, [])
    return tree


def _kill(node: subprocess.Popen) -> None:
    for pid in _process_tree(node.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.wait()


@pytest.mark.slow
def test_two_nodes_train_like_one_node_with_two_ranks(mini_ms1m, tmp_path):
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    two_nodes.mkdir(), one_node.mkdir()
    nodes = _launch_two_nodes(_args(mini_ms1m), two_nodes)
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            _kill(node)
    assert codes == [0, 0], (two_nodes / "node0.log").read_text()[-3000:] + (two_nodes / "node1.log").read_text()[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in (two_nodes / "node1.log").read_text()

    visionzoo("fit", *_args(mini_ms1m), "--trainer.devices", "2", cwd=one_node, env=ONE_THREAD)
    assert sorted(train_losses(two_nodes / "run")) == list(range(12))  # 768 images / (2 ranks x 32)
    assert train_losses(two_nodes / "run") == train_losses(one_node / "run")
    assert_same_weights(final_weights(two_nodes / "run"), final_weights(one_node / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"], ids=["rank_dies", "rank_hangs"])
def test_when_one_rank_fails_the_other_exits_with_an_error_within_the_timeout(fault, mini_ms1m, tmp_path):
    injection = tmp_path / "fault.yaml"
    injection.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.fault_injection.SignalAtStep\n"
        f"      init_args: {{global_step: 3, signal_name: {fault}, rank: 1}}\n"
    )
    args = _args(mini_ms1m, "--config", str(injection), "--trainer.strategy.init_args.timeout", f"0:00:{TIMEOUT_S}")
    nodes = _launch_two_nodes(args, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while "step 3 " not in (tmp_path / "node0.log").read_text():  # rank 0 has done 3 steps
            assert time.monotonic() < deadline and nodes[0].poll() is None, (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(0.5)
        started = time.monotonic()
        code = nodes[0].wait(timeout=TIMEOUT_S + 120)
        waited = time.monotonic() - started
    finally:
        for node in nodes:
            _kill(node)
    output = (tmp_path / "node0.log").read_text()
    assert code != 0, output[-3000:]
    assert waited < TIMEOUT_S + 60, (waited, output[-3000:])
    if fault == "SIGSTOP":
        # gloo: "Timed out waiting 20000ms for send operation" or "Application timeout caused pair closure"
        assert "timed out" in output.lower() or "timeout" in output.lower(), output[-3000:]
