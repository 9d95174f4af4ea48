"""Search-Softmax's loss search: the policy and its rewards by hand, one search step on 2 gloo
ranks (best worker copied to all, the REINFORCE step equal to the single-process one), and the
search running inside `visionzoo fit` with DDP on two CPU processes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.face.search_softmax import SearchSoftmaxRecognizer
from lightning_modules.nn.loss_search import GaussianLossPolicy, normalised_rewards

from conftest import CONFIGS
from runner import free_port, metrics, visionzoo

ACCURACIES = [0.75, 0.9]  # the reward accuracy of rank 0 and rank 1: rank 1 is the best worker
SAMPLES = [0.3, -0.1]


def test_rewards_are_centred_and_scaled_by_the_spread():
    rewards = normalised_rewards(torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64))
    torch.testing.assert_close(rewards, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (1 + 2.5e-6))


def test_policy_gradient_is_the_gaussian_score_times_the_reward():
    policy = GaussianLossPolicy(sigma=0.2)
    with torch.no_grad():
        policy.mu.fill_(0.3)
    (-policy.log_prob(torch.tensor([0.5])) * 2.0).backward()
    torch.testing.assert_close(policy.mu.grad, torch.tensor([-2.0 * (0.5 - 0.3) / 0.2**2]))


def test_relu_on_the_first_mean_keeps_a_gradient_below_zero():
    policy = GaussianLossPolicy(sigma=0.2)
    with torch.no_grad():
        policy.mu.fill_(-0.4)
    assert float(policy.distribution().mean.detach()) == 0.0  # the ReLU's value
    (-policy.log_prob(torch.tensor([0.1]))).backward()
    torch.testing.assert_close(policy.mu.grad, torch.tensor([-0.1 / 0.2**2]))  # straight through
    draws = torch.stack([policy.sample(torch.Generator().manual_seed(i)) for i in range(200)])
    a = GaussianLossPolicy.search_parameters(draws)
    assert (a <= 0).all() and abs(float(draws.mean())) < 0.05 and 0.15 < float(draws.std()) < 0.25


def _worker(seed: int) -> tuple[SearchSoftmaxRecognizer, torch.optim.Optimizer]:
    """A small search worker whose weights and momentum buffers differ by seed."""
    torch.manual_seed(seed)
    model = SearchSoftmaxRecognizer(num_classes=6, backbone="test_resnet", embedding_size=8)
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("policy.")],
                                lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 112, 112)).sum().backward()
    model.centres.grad = torch.randn_like(model.centres)
    optimizer.step()
    model._sample = torch.tensor([SAMPLES[seed]])
    return model, optimizer


def _search_step_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        model, optimizer = _worker(rank)
        accuracies = model.search_step(ACCURACIES[rank], [optimizer])
        torch.save({"accuracies": accuracies, "state": model._worker_state([optimizer]),
                    "mu": model.policy.mu.detach()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_search_step_copies_the_best_worker_and_sums_the_policy_gradient(tmp_path):
    mp.spawn(_search_step_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    best, best_optimizer = _worker(1)
    best_state = best._worker_state([best_optimizer])
    assert len(best_state) > len(list(best.parameters()))  # buffers and momentum are copied too
    policy = GaussianLossPolicy(sigma=0.2)
    rewards = normalised_rewards(torch.tensor(ACCURACIES, dtype=torch.float64)).float()
    (-sum(policy.log_prob(torch.tensor([x])) * r for x, r in zip(SAMPLES, rewards))).backward()
    torch.optim.Adam(policy.parameters(), lr=0.05, betas=(0.5, 0.999)).step()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["accuracies"], torch.tensor(ACCURACIES))
        for copied, expected in zip(result["state"], best_state, strict=True):
            torch.testing.assert_close(copied, expected)
        torch.testing.assert_close(result["mu"], policy.mu.detach())
    assert float(policy.mu.detach()) != 0.0


def test_rewarded_epoch_before_sampled_epoch_is_an_error():
    with pytest.raises(ValueError, match=r"first_rewarded_epoch=0 .*first_sampled_epoch=1"):
        SearchSoftmaxRecognizer(num_classes=4, backbone="test_resnet", first_sampled_epoch=1, first_rewarded_epoch=0)


@pytest.mark.slow
def test_search_runs_over_two_ddp_workers(mini_ms1m, tmp_path):
    visionzoo("fit", "--config", str(CONFIGS / "ms1m/search_softmax_r50.yaml"), "--config", str(CONFIGS / "ms1m/mini.yaml"),
              "--data.init_args.root", str(mini_ms1m), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
              "--trainer.strategy", "ddp", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3",
              "--trainer.check_val_every_n_epoch", "1", "--model.first_sampled_epoch", "0",
              "--model.first_rewarded_epoch", "1", cwd=tmp_path)
    rows = metrics(tmp_path / "runs/ms1m/search_softmax/ms1m")
    searched = [r for r in rows if r.get("search/mu")]
    assert len(searched) == 2  # epochs 1 and 2 are rewarded
    assert all(0.0 <= float(r["search/best_acc"]) <= 1.0 and r["search/best_worker"] in ("0.0", "1.0") for r in searched)
    assert float(searched[-1]["search/mu"]) != 0.0  # the policy moved
    drawn = [float(r["search/a"]) for r in rows if r.get("search/a")]
    assert len(drawn) == 3 and all(a <= 0 for a in drawn) and len(set(drawn)) == 3
