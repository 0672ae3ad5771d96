import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from toklip.checkpoints import CheckpointError
from toklip.distributed import end_process_group
from toklip.training import VQTrainingModule


def perceptual_module(teacher_file, weight=1.0):
    return VQTrainingModule(
        "llamagen_tiny",
        perceptual_weight=weight,
        perceptual_teacher="tiny_teacher_64",
        perceptual_teacher_checkpoint=str(teacher_file),
        optim={"total_steps": 10},
    )


def test_without_a_teacher_the_loss_has_the_three_vq_terms(images):
    losses, out = VQTrainingModule("llamagen_tiny").compute_losses(images)
    assert set(losses) == {"reconstruction", "codebook", "commitment"}
    assert out["reconstruction"].shape == images.shape and out["indices"].shape == (2, 8, 8)


def test_perceptual_term_compares_the_teachers_patch_tokens(tiny_teacher_checkpoint, images):
    m = perceptual_module(tiny_teacher_checkpoint, weight=3.0)
    losses, out = m.compute_losses(images)
    trunk = m.perceptual_teacher.visual.trunk  # a timm ViT; the images are already at its 64 px
    target = trunk.forward_features(images)
    assert target.shape == (2, 64, 128)  # 64 px, patch 8: 8x8 tokens of width 128
    torch.testing.assert_close(
        losses["perceptual"], 3.0 * torch.nn.functional.mse_loss(trunk.forward_features(out["reconstruction"]), target)
    )
    assert losses["perceptual"] > 0


def test_perceptual_gradient_trains_the_vq_and_leaves_the_teacher_frozen(tiny_teacher_checkpoint, images):
    m = perceptual_module(tiny_teacher_checkpoint)
    losses, _ = m.compute_losses(images)
    losses["perceptual"].backward()
    assert m.vq.decoder.conv_out.weight.grad.abs().sum() > 0
    assert m.vq.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert all(p.grad is None and not p.requires_grad for p in m.perceptual_teacher.parameters())
    optimised = {id(p) for group in m.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in m.perceptual_teacher.parameters()}


@pytest.mark.parametrize("weight, teacher", [(1.0, None), (0.0, "tiny_teacher_64"), (-1.0, None)])
def test_perceptual_options_must_agree(weight, teacher):
    with pytest.raises(ValueError, match="perceptual"):
        VQTrainingModule("llamagen_tiny", perceptual_weight=weight, perceptual_teacher=teacher)


def test_missing_perceptual_teacher_weights_name_the_option(tmp_path):
    with pytest.raises(CheckpointError, match="perceptual_teacher_checkpoint"):
        perceptual_module(tmp_path / "absent.safetensors")


def test_checkpoints_leave_the_perceptual_teacher_out_and_get_it_back(tiny_teacher_checkpoint):
    m = perceptual_module(tiny_teacher_checkpoint)
    checkpoint = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("perceptual_teacher.") for k in checkpoint["state_dict"])
    m.on_load_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(m.state_dict())


def _unused(used: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[used] = False
    return torch.nonzero(mask).flatten()


def test_restart_reseeds_exactly_the_unused_codes_from_the_batch(images):
    torch.manual_seed(0)
    m = VQTrainingModule("llamagen_tiny", restart_every=0)
    out = m.quantize(images)
    used = torch.unique(out["indices"])
    before = m.vq.quantize.embedding.weight.clone()
    dead = m.restart_dead_codes(used, out["latents"], step=1)
    assert torch.equal(dead, _unused(used, 1024)) and 0 < dead.numel() < 1024
    after = m.vq.quantize.embedding.weight
    assert torch.equal(after[used], before[used])
    latents = out["latents"].reshape(-1, out["latents"].shape[-1])
    assert torch.cdist(after[dead], latents).min(dim=1).values.max() < 0.2  # a latent plus 0.01-scale noise
    assert m.restart_dead_codes(used, out["latents"], step=1).numel() == 0  # fresh codes get restart_every steps


def _restart_on_rank(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # one initial codebook; each rank then sees its own images
    m = VQTrainingModule("llamagen_tiny", restart_every=0)
    torch.manual_seed(100 + rank)
    result = m.quantize(torch.rand(2, 3, 64, 64) * 2 - 1)
    used = torch.unique(result["indices"])
    dead = m.restart_dead_codes(used, result["latents"], step=1)
    latents = result["latents"].reshape(-1, result["latents"].shape[-1])
    torch.save({"used": used, "dead": dead, "codebook": m.vq.quantize.embedding.weight.detach(), "latents": latents}, f"{out}.{rank}")
    end_process_group()  # not destroy alone: gloo can abort the exit (toklip.distributed)


def test_ddp_ranks_restart_the_same_codes_to_the_same_vectors(tmp_path, free_port):
    """Usage is summed over ranks and the new vectors broadcast: the ranks' codebooks never drift apart."""
    out = tmp_path / "restart.pt"
    mp.spawn(_restart_on_rank, args=(2, free_port, str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    used_anywhere = torch.unique(torch.cat([r["used"] for r in ranks]))
    assert not torch.equal(ranks[0]["used"], ranks[1]["used"])  # the ranks did see different codes
    for r in ranks:
        assert torch.equal(r["dead"], _unused(used_anywhere, 1024))
    assert torch.equal(ranks[0]["codebook"], ranks[1]["codebook"])
    # ... rank 0's: each new vector is one of its latents plus 0.01-scale noise (not, say, a mean over ranks).
    assert torch.cdist(ranks[0]["codebook"][ranks[0]["dead"]], ranks[0]["latents"]).min(dim=1).values.max() < 0.2


def test_the_vq_trains_in_train_mode_and_its_teacher_stays_frozen(tiny_teacher_checkpoint):
    m = perceptual_module(tiny_teacher_checkpoint)
    assert m.vq.training and all(module.training for module in m.vq.modules())  # Lightning keeps the modes it finds
    assert not m.perceptual_teacher.training
    m.eval()
    assert not m.vq.training
    m.train()
    assert m.vq.training and not m.perceptual_teacher.training
