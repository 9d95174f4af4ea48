"""Search-Softmax (Wang et al., "Loss Function Search for Face Recognition", ICML 2020,
arXiv 2007.06542): the margin is searched, not designed.

Every margin softmax lowers the target probability p; LFS writes the modulated probability as
p' = p / (α·p + 1 − α), α = a·e^{s/3}, a ≤ 0, and searches a by REINFORCE
(:mod:`lightning_modules.nn.loss_search`, :class:`~lightning_modules.nn.margins.SearchSoftmaxHead`).
As in the authors' ``main.py`` and ``loss_func_search.py``, the search is a population over
the ranks:

1. Each rank is a search worker: it trains its own copy of the model (no gradient averaging
   across ranks) on the **whole** training set every epoch, in the order every worker shares
   (the authors' ``LMDBDistributeSampler`` ignores the rank), with a plain normalised FC head
   over all classes (s·cos; the README recommends it while searching).
2. Until the first draw every worker uses a = −1 (the authors' initial ``a``). From epoch 2
   (0-based, ``first_sampled_epoch``; the authors' ``epoch >= 2``) each worker draws its own
   a = −|x|, x ~ π, at the start of every epoch.
3. From epoch 2 (``first_rewarded_epoch``; the authors' ``epoch + 1 >= 3``), at the end of each
   epoch every worker measures its verification accuracy on the reward set (LFW) over all
   pairs; the accuracies are gathered, the best worker's weights and buffers are copied to all
   workers, and the policy takes one REINFORCE step on the normalised rewards, its gradient
   averaged over the workers.

So after every rewarded epoch all ranks hold the same weights, and Lightning's validation and
checkpoints see them. Defaults from the authors' ``main.py`` (method card §3): s = 32, σ = 0.2,
policy Adam lr 0.05 betas (0.5, 0.999), SGD lr 0.1 momentum 0.9 weight decay 1e-4, 20 epochs,
lr x0.1 at epochs 4, 8, 10.

Deviations from the authors' code:

- Each of their workers was 4 GPUs (DataParallel); here it is one rank.
- The workers start from the same weights and draw the same augmentations (``seed_everything``),
  where the authors' unseeded processes differ in both: here the workers differ by their a
  only, and are identical until the first draw.
- Only the ``global`` search (one a) is implemented, so the policy has one Gaussian (the
  authors' nine others never reach the global loss).
- Options, off by default: ``first_mean_gradient: straight_through`` lets μ₀ move (the authors'
  ReLU keeps it at 0); ``copy_optimizer_state: true`` copies the best worker's momentum with its
  weights (the authors copy the ``state_dict`` only).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.base import Evaluation
from lightning_modules.distributed.comm import all_gather, broadcast_, world_info
from lightning_modules.face.base import FaceRecognitionModule
from lightning_modules.framework import is_last_batch, keep_out_of_ddp
from lightning_modules.nn.backbones import create_embedding_backbone
from lightning_modules.nn.loss_search import GaussianLossPolicy, normalised_rewards
from lightning_modules.nn.margins import SearchSoftmaxHead
from lightning_modules.recipe import OptimizerRecipe


class SearchSoftmaxRecognizer(FaceRecognitionModule):
    """Search workers over the ranks, each with its own a (see the module docstring)."""

    method_name = "search_softmax"
    shards_training_data = False  # every worker trains on the whole set (step 1)

    def __init__(
        self,
        num_classes: int,
        head: SearchSoftmaxHead | None = None,
        backbone: str = "iresnet50",
        embedding_size: int = 512,
        dropout: float = 0.0,
        pretrained: bool = False,
        weights: str | None = None,
        sigma: float = 0.2,
        policy_lr: float = 0.05,
        first_mean_gradient: Literal["relu", "straight_through"] = "relu",
        first_sampled_epoch: int = 2,
        first_rewarded_epoch: int = 2,
        copy_optimizer_state: bool = False,
        reward_set: str | None = None,
        optim: OptimizerRecipe = OptimizerRecipe(
            lr=0.1, weight_decay=1e-4, schedule="step", milestones=(4, 8, 10)
        ),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= first_sampled_epoch <= first_rewarded_epoch:
            raise ValueError(f"model.first_rewarded_epoch={first_rewarded_epoch} must come at or after "
                             f"model.first_sampled_epoch={first_sampled_epoch} >= 0: a reward needs a drawn a")
        self.save_hyperparameters(ignore=["head"])
        self.backbone = create_embedding_backbone(backbone, embedding_size, pretrained, weights, dropout)
        self.centres = nn.Parameter(torch.empty(num_classes, embedding_size).normal_(0.0, 0.01))
        self.head = head if head is not None else SearchSoftmaxHead(s=32.0, a=-1.0)  # a until the first draw
        self.policy = GaussianLossPolicy(num_parameters=1, sigma=sigma, first_mean_gradient=first_mean_gradient)
        self.policy_optimizer = torch.optim.Adam(self.policy.parameters(), lr=policy_lr, betas=(0.5, 0.999))
        self._action: Tensor | None = None  # this worker's a = −|x| of the epoch

    def configure_model(self) -> None:
        """Workers train independently: DDP averages only the policy (whose gradient in a
        training step is zero; its update is the REINFORCE step)."""
        model = [name for name, _ in self.named_parameters() if not name.startswith("policy.")]
        keep_out_of_ddp(self, model + [name for name, _ in self.named_buffers()])

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        cos = F.normalize(self(batch["image"]), dim=1) @ F.normalize(self.centres, dim=1).T
        log_p = self.head(cos, batch["label"]).log_softmax(dim=1)
        loss = self.head.loss(log_p.gather(1, batch["label"][:, None]).squeeze(1)).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss + 0.0 * self.policy.mu.sum()  # DDP needs one synchronised parameter

    def parameters_with_own_optimizer(self) -> Iterator[nn.Parameter]:
        """The policy has its own optimizer (the REINFORCE step)."""
        return self.policy.parameters()

    # ---------------------------------------------------------------------------- the search

    def on_train_epoch_start(self) -> None:
        if self.current_epoch >= self.hparams.first_sampled_epoch:
            rank, _ = world_info()
            generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.current_epoch * 1009 + rank)
            self._action = self.policy.search_parameters(self.policy.sample(generator))
            self.head.a = float(self._action[0])
        self.log("search/a", self.head.a, sync_dist=False, rank_zero_only=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """At the epoch's last batch, before Lightning's validation: reward, copy the best, update π."""
        super().on_train_batch_end(outputs, batch, batch_idx)
        if is_last_batch(self.trainer) and self.current_epoch >= self.hparams.first_rewarded_epoch:
            accuracies = self.search_step(self._reward_accuracy(), self.trainer.optimizers)
            self.log_dict({"search/best_acc": float(accuracies.max()), "search/best_worker": float(accuracies.argmax()),
                           "search/mu": float(self.policy.mu[0])},
                          on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)

    def search_step(self, accuracy: float, optimizers: list[torch.optim.Optimizer]) -> Tensor:
        """Gather every worker's reward accuracy, copy the best worker's weights and buffers (and
        with ``copy_optimizer_state`` its optimizer state) to all, and take one REINFORCE step of
        the policy. Returns the accuracies by rank."""
        rank, world_size = world_info()
        accuracies = all_gather(torch.tensor([accuracy], device=self.device)).cpu()
        broadcast_(self._worker_state(optimizers), src=int(accuracies.argmax()))
        rewards = normalised_rewards(accuracies.double()).float()
        self.policy_optimizer.zero_grad()
        (-self.policy.log_prob(self._action) * rewards[rank]).backward()
        if world_size > 1:
            dist.all_reduce(self.policy.mu.grad)
            self.policy.mu.grad /= world_size
        self.policy_optimizer.step()
        return accuracies

    def _worker_state(self, optimizers: list[torch.optim.Optimizer]) -> list[Tensor]:
        """The tensors copied from the best worker, in a fixed order: weights and buffers, and
        the optimizer state with ``copy_optimizer_state``."""
        tensors = [p for name, p in self.named_parameters() if not name.startswith("policy.")]
        tensors += [b for _, b in self.named_buffers()]
        if not self.hparams.copy_optimizer_state:
            return tensors
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    tensors += [v for v in optimizer.state.get(p, {}).values() if isinstance(v, Tensor) and v.dim() > 0]
        return tensors

    @torch.no_grad()
    def _reward_accuracy(self) -> float:
        """This worker's verification accuracy on the reward set, over all of its pairs: the
        DataModule's loader of that set (not split over the ranks: every worker scores its own
        model on all pairs) through the evaluation layer, without gathering across ranks."""
        datamodule = self.trainer.datamodule
        names = datamodule.eval_set_names("val")
        name = self.hparams.reward_set or names[0]
        if name not in names:
            raise ValueError(f"model.reward_set={name!r} is not one of data.val_sets {names}")
        evaluation = Evaluation(self.evaluation_metrics("val"))
        was_training = self.training
        self.eval()
        for batch in datamodule.val_dataloader()[names.index(name)]:
            batch = {key: value.to(self.device) if isinstance(value, Tensor) else value for key, value in batch.items()}
            evaluation.update({**batch, **self.evaluation_outputs(batch)})
        self.train(was_training)
        return evaluation.compute(across_ranks=False)[f"{name}_acc"]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["search"] = {"a": self.head.a, "action": self._action, "policy_optimizer": self.policy_optimizer.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "search" in checkpoint:
            self.head.a = checkpoint["search"]["a"]
            self._action = checkpoint["search"]["action"]
            self.policy_optimizer.load_state_dict(checkpoint["search"]["policy_optimizer"])
