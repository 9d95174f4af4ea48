"""Search-Softmax's loss search: the policy and its rewards by hand (log π at a = −|x|, the
authors' ReLU that keeps μ₀ at 0, the straight-through option), one search step on 2 gloo ranks
(best worker copied to all, the REINFORCE gradient averaged over the workers), and the search
inside `visionzoo fit` with DDP on two CPU processes: every worker trains on the whole set, a = −1
until the first draw at epoch 2, and the workers learn the mini set."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules.ms1m import MS1MDataModule
from lightning_modules.face.search_softmax import SearchSoftmaxRecognizer
from lightning_modules.nn.loss_search import GaussianLossPolicy, normalised_rewards

from conftest import CONFIGS
from runner import free_port, metrics, visionzoo

EPOCHS = 10  # of the whole mini set on each worker: 240 steps
ACCURACIES = [0.75, 0.9]  # the reward accuracy of rank 0 and rank 1: rank 1 is the best worker
ACTIONS = [-0.3, -0.1]  # each worker's a = −|x|


def test_rewards_are_centred_and_scaled_by_the_spread():
    rewards = normalised_rewards(torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64))
    torch.testing.assert_close(rewards, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (1 + 2.5e-6))


def test_policy_gradient_is_the_gaussian_score_at_a_times_the_reward():
    policy = GaussianLossPolicy(sigma=0.2)
    with torch.no_grad():
        policy.mu.fill_(0.3)
    (-policy.log_prob(torch.tensor([-0.5])) * 2.0).backward()  # log π at a = −|x|, not at x
    torch.testing.assert_close(policy.mu.grad, torch.tensor([-2.0 * (-0.5 - 0.3) / 0.2**2]))


def test_the_authors_relu_keeps_the_first_mean_at_zero_and_straight_through_moves_it():
    authors = GaussianLossPolicy(sigma=0.2)  # μ₀ = 0 under torch's ReLU: zero gradient
    (-authors.log_prob(torch.tensor([-0.3])) * 1.5).backward()
    assert float(authors.mu.grad) == 0.0
    draws = torch.stack([authors.sample(torch.Generator().manual_seed(i)) for i in range(200)])
    a = GaussianLossPolicy.search_parameters(draws)
    assert (a <= 0).all() and abs(float(draws.mean())) < 0.05 and 0.15 < float(draws.std()) < 0.25

    straight = GaussianLossPolicy(sigma=0.2, first_mean_gradient="straight_through")
    with torch.no_grad():
        straight.mu.fill_(-0.4)
    assert float(straight.distribution().mean.detach()) == 0.0  # the ReLU's value
    (-straight.log_prob(torch.tensor([-0.1]))).backward()
    torch.testing.assert_close(straight.mu.grad, torch.tensor([0.1 / 0.2**2]))  # d/dμ of (a − μ)²/2σ² at μ = 0
    with pytest.raises(ValueError, match="first_mean_gradient"):
        GaussianLossPolicy(first_mean_gradient="identity")


def _worker(seed: int, copy_optimizer_state: bool) -> tuple[SearchSoftmaxRecognizer, torch.optim.Optimizer]:
    """A small search worker whose weights and momentum buffers differ by seed."""
    torch.manual_seed(seed)
    model = SearchSoftmaxRecognizer(num_classes=6, backbone="test_resnet", embedding_size=8,
                                    first_mean_gradient="straight_through", copy_optimizer_state=copy_optimizer_state)
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("policy.")],
                                lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 112, 112)).sum().backward()
    model.centres.grad = torch.randn_like(model.centres)
    optimizer.step()
    model._action = torch.tensor([ACTIONS[seed]])
    return model, optimizer


def _momentum(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [optimizer.state[p]["momentum_buffer"] for group in optimizer.param_groups for p in group["params"]]


def _search_step_worker(rank: int, world_size: int, port: int, out_dir: str, copy_optimizer_state: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        model, optimizer = _worker(rank, copy_optimizer_state)
        accuracies = model.search_step(ACCURACIES[rank], [optimizer])
        torch.save({"accuracies": accuracies, "weights": [t.detach() for t in model._worker_state([])],
                    "momentum": _momentum(optimizer), "mu": model.policy.mu.detach()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("copy_optimizer_state", [False, True])
def test_search_step_copies_the_best_worker_and_averages_the_policy_gradient(tmp_path, copy_optimizer_state):
    mp.spawn(_search_step_worker, args=(2, free_port(), str(tmp_path), copy_optimizer_state), nprocs=2, join=True)
    best, best_optimizer = _worker(1, copy_optimizer_state)
    policy = GaussianLossPolicy(sigma=0.2, first_mean_gradient="straight_through")
    rewards = normalised_rewards(torch.tensor(ACCURACIES, dtype=torch.float64)).float()
    (-sum(policy.log_prob(torch.tensor([a])) * r for a, r in zip(ACTIONS, rewards)) / 2).backward()
    torch.optim.Adam(policy.parameters(), lr=0.05, betas=(0.5, 0.999)).step()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["accuracies"], torch.tensor(ACCURACIES))
        for copied, expected in zip(result["weights"], best._worker_state([]), strict=True):  # weights and buffers
            torch.testing.assert_close(copied, expected)
        own = _momentum(_worker(rank, copy_optimizer_state)[1])  # the authors keep each worker's momentum
        for momentum, kept, of_best in zip(result["momentum"], own, _momentum(best_optimizer), strict=True):
            torch.testing.assert_close(momentum, of_best if copy_optimizer_state else kept)
        torch.testing.assert_close(result["mu"], policy.mu.detach())
    assert float(policy.mu.detach()) != 0.0


def test_rewarded_epoch_before_sampled_epoch_is_an_error():
    with pytest.raises(ValueError, match=r"first_rewarded_epoch=0 .*first_sampled_epoch=1"):
        SearchSoftmaxRecognizer(num_classes=4, backbone="test_resnet", first_sampled_epoch=1, first_rewarded_epoch=0)


@pytest.mark.slow
def test_search_workers_train_on_the_whole_set_draw_from_epoch_2_and_learn(mini_ms1m, tmp_path):
    visionzoo("fit", "--config", str(CONFIGS / "ms1m/search_softmax_r50.yaml"), "--config", str(CONFIGS / "ms1m/mini.yaml"),
              "--data.init_args.root", str(mini_ms1m), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
              "--trainer.strategy", "ddp", "--trainer.max_epochs", str(EPOCHS), "--trainer.log_every_n_steps", "1",
              "--trainer.check_val_every_n_epoch", str(EPOCHS), cwd=tmp_path)
    rows = metrics(tmp_path / "runs/ms1m/search_softmax/ms1m")
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    whole_set = MS1MDataModule(root=str(mini_ms1m), batch_size=32).num_images
    assert len(steps) == EPOCHS * (whole_set // 32)  # each worker's epoch is the whole set, not half of it
    drawn = [float(r["search/a"]) for r in rows if r.get("search/a")]
    assert len(drawn) == EPOCHS and drawn[:2] == [-1.0, -1.0]  # a = −1 until the first draw, at epoch 2
    assert all(a <= 0 for a in drawn[2:]) and len(set(drawn[2:])) == EPOCHS - 2
    searched = [r for r in rows if r.get("search/mu")]
    assert len(searched) == EPOCHS - 2  # rewarded from epoch 2
    assert all(r["search/best_worker"] in ("0.0", "1.0") for r in searched)
    assert {float(r["search/mu"]) for r in searched} == {0.0}  # the authors' ReLU keeps μ₀ at 0
    accuracy = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert accuracy[-1] > 0.75, accuracy  # chance is 0.5
