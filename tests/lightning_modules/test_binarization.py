"""BEBR's recurrent binarization (``lightning_modules/nn/binarization.py``): the straight-through
sign, residual coding round by round, decoding stored codes, the NCE loss against a queue with
hard negatives, and, on synthetic clustered embeddings, recurrent coding against sign-only
coding at the same number of bits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.nn.binarization import RecurrentBinarizer, queue_nce_loss, sign_ste
from lightning_modules.nn.contrastive import FeatureQueue


def test_sign_ste_is_the_sign_forward_and_the_clipped_identity_backward():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]  # passed through where |x| <= 1


def test_each_round_codes_the_residual_of_the_previous_ones_and_stored_codes_decode_alike():
    """u = 2: b_t = sign(enc_t(x_{t-1})), x_t = x_{t-1} - dec_t(b_t), reconstruction the sum,
    recomputed here module by module; ``decode`` of the codes (±1 or 0/1 bits) gives it back."""
    torch.manual_seed(0)
    binarizer = RecurrentBinarizer(12, 16, extra_rounds=2, hidden_size=20, blocks=1).eval()
    features = F.normalize(torch.randn(5, 12), dim=1)
    with torch.no_grad():
        codes, reconstruction = binarizer(features)
        residual, expected_codes, expected = features, [], torch.zeros_like(features)
        for encoder, decoder in zip(binarizer.encoders, binarizer.decoders):
            code = torch.where(encoder(residual) >= 0, 1.0, -1.0)
            expected_codes.append(code)
            expected = expected + decoder(code)
            residual = residual - decoder(code)
        assert codes.shape == (5, 48) and binarizer.bits == 48 and set(codes.unique().tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(codes, torch.cat(expected_codes, dim=1))
        torch.testing.assert_close(reconstruction, expected)
        torch.testing.assert_close(binarizer.decode(codes), reconstruction)
        torch.testing.assert_close(binarizer.decode((codes > 0).to(torch.uint8)), reconstruction)


def test_the_gradient_reaches_every_round_encoder_through_the_sign():
    """The card's pitfall: without the straight-through estimator the encoders get no gradient."""
    torch.manual_seed(0)
    binarizer = RecurrentBinarizer(8, 8, extra_rounds=1, hidden_size=16)
    _, reconstruction = binarizer(F.normalize(torch.randn(6, 8), dim=1))
    reconstruction.pow(2).sum().backward()
    for encoder in binarizer.encoders:
        assert encoder[-1].weight.grad.abs().sum() > 0


def test_queue_nce_loss_on_a_hand_worked_case_and_with_the_hardest_negatives_only():
    """One query on axis 0 (normalised inside), its positive on axis 0, three queue negatives
    with cosines 0, 0.6 and -1: loss = -log(e^{1/τ} / (e^{1/τ} + e^{0} + e^{0.6/τ} + e^{-1/τ}));
    with one hard negative only the 0.6 one is kept."""
    query, positive = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    t = 0.5
    logits = torch.tensor([1.0, 0.0, 0.6, -1.0]) / t
    torch.testing.assert_close(queue_nce_loss(query, positive, queue, t), -torch.log_softmax(logits, 0)[0])
    hard = torch.tensor([1.0, 0.6]) / t
    torch.testing.assert_close(queue_nce_loss(query, positive, queue, t, hard_negatives=1), -torch.log_softmax(hard, 0)[0])


def _neighbour_recall(space: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """The fraction of each vector's k nearest neighbours by ``reference`` inner product that
    ``space`` also ranks among its k nearest (the float search a binary code keeps)."""
    found = (space @ space.T).fill_diagonal_(-1e9).topk(k, dim=1).indices
    wanted = (reference @ reference.T).fill_diagonal_(-1e9).topk(k, dim=1).indices
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, wanted)) / found.numel()


def _trained_recall(extra_rounds: int, code_bits: int, train: torch.Tensor, test: torch.Tensor, seed: int) -> float:
    torch.manual_seed(seed)
    binarizer = RecurrentBinarizer(train.shape[1], code_bits, extra_rounds, hidden_size=128)
    queue = FeatureQueue(512, train.shape[1])
    optimizer = torch.optim.Adam(binarizer.parameters(), 1e-3)
    for _ in range(300):
        batch = train[torch.randint(len(train), (128,))]
        _, reconstruction = binarizer(batch)
        loss = queue_nce_loss(reconstruction, batch, queue.negatives()) + (reconstruction - batch).pow(2).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        queue.enqueue(batch)
    with torch.no_grad():
        _, reconstruction = binarizer.eval()(test)
    return _neighbour_recall(F.normalize(reconstruction, dim=1), test)


def test_recurrent_coding_keeps_more_of_the_float_search_than_sign_only_at_the_same_bits():
    """32 bits a vector of 32-d embeddings around 40 centres: u = 1 with 16 bits a round against
    u = 0 (sign-only) with 32, the same loss and steps, two seeds each; the neighbours of the
    float search kept in the reconstructed space. Measured 0.406 / 0.401 against 0.375 / 0.370
    (about 4 CPU seconds). The sign of the raw 32-d embedding keeps 0.405 on this isotropic
    data: the trained 32-bit codes only match it (README, BEBR row)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(40, 32, generator=generator)

    def embeddings(count: int) -> torch.Tensor:
        labels = torch.randint(40, (count,), generator=generator)
        return F.normalize(centres[labels] + 0.9 * torch.randn(count, 32, generator=generator), dim=1)

    train, test = embeddings(4000), embeddings(1000)
    recurrent = [_trained_recall(1, 16, train, test, seed) for seed in (0, 1)]
    sign_only = [_trained_recall(0, 32, train, test, seed) for seed in (0, 1)]
    print(recurrent, sign_only)
    assert sum(recurrent) / 2 >= sum(sign_only) / 2 + 0.02
