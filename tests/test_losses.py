"""Loss values against hand-computed formulas and open_clip's own losses."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from toklip.losses import ClipLoss, DistillLoss, SigLipLoss


def features(n=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    logits = 2.0 * torch.tensor([[1.0, 0.6], [0.0, 0.8]])
    # image->text rows and text->image columns, each a softmax cross-entropy on the diagonal.
    i2t = -(math.log(math.exp(logits[0, 0]) / (math.exp(logits[0, 0]) + math.exp(logits[0, 1])))
            + math.log(math.exp(logits[1, 1]) / (math.exp(logits[1, 0]) + math.exp(logits[1, 1])))) / 2  # fmt: skip
    t2i = -(math.log(math.exp(logits[0, 0]) / (math.exp(logits[0, 0]) + math.exp(logits[1, 0])))
            + math.log(math.exp(logits[1, 1]) / (math.exp(logits[0, 1]) + math.exp(logits[1, 1])))) / 2  # fmt: skip
    assert ClipLoss()(image, text, scale).item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_clip_loss_equals_open_clip():
    image, text = features(8, 5)
    scale = torch.tensor(10.0)
    assert torch.allclose(ClipLoss()(image, text, scale), open_clip.ClipLoss()(image, text, scale), atol=1e-6)


def test_siglip_loss_by_hand_and_against_open_clip():
    image, text = features(3, 4, seed=1)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(3) - 1
    by_hand = -sum(math.log(1 / (1 + math.exp(-labels[i, j] * logits[i, j]))) for i in range(3) for j in range(3)) / 3
    ours = SigLipLoss()(image, text, scale, bias)
    assert ours.item() == pytest.approx(by_hand, abs=1e-5)
    assert torch.allclose(ours, open_clip.loss.SigLipLoss()(image, text, scale, bias), atol=1e-6)


def test_distillation_terms():
    student, teacher = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]])
    # normalised: (0.6, 0.8) vs (0, 1): squared errors 0.36 and 0.04, mean 0.2
    assert DistillLoss(1000.0)(student, teacher)["distill"].item() == pytest.approx(200.0, rel=1e-6)
    assert DistillLoss(2.0, form="cosine")(student, teacher)["distill"].item() == pytest.approx(2.0 * (1 - 0.8), rel=1e-6)
    tokens, teacher_tokens = torch.ones(1, 2, 2), torch.zeros(1, 2, 2)
    losses = DistillLoss(1000.0, token_weight=10.0)(student, teacher, tokens, teacher_tokens)
    assert losses["token_distill"].item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="per-token"):
        DistillLoss(1.0, token_weight=10.0)(student, teacher)


def test_distillation_does_not_reach_the_teacher():
    student, teacher = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    DistillLoss()(student, teacher)["distill"].backward()
    assert student.grad is not None and teacher.grad is None


def test_local_loss_needs_gathered_gradients():
    with pytest.raises(ValueError, match="gather_with_grad"):
        ClipLoss(local_loss=True)
