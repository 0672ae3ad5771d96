"""A tokenizer of the user's own plugs in by name or by `_target_`, and trains like a built-in one."""

import pytest
import torch
from test_training import datamodule, trainer
from torch import nn

import toklip
from toklip.config import ConfigError
from toklip.preflight import check_targets
from toklip.tokenizers import VQTokenizer, register_configured_tokenizer, tokenizer_downsample


class PatchVQ(VQTokenizer):
    """A toy tokenizer: one linear map per 8x8 patch, a plain codebook searched by L2."""

    def __init__(self, codebook_size: int = 64, code_dim: int = 16) -> None:
        super().__init__(codebook_size, code_dim, downsample=8, l2_normalized=False)
        self.to_latent = nn.Conv2d(3, code_dim, 8, stride=8)
        self.embedding = nn.Embedding(codebook_size, code_dim)
        self.to_image = nn.ConvTranspose2d(code_dim, 3, 8, stride=8)
        self._freeze()

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_latent(images)

    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def decode_latents(self, codes: torch.Tensor) -> torch.Tensor:
        return self.to_image(codes)

    def trainable_codebook(self) -> nn.Parameter:
        return self.embedding.weight


@toklip.register_tokenizer
def patch_vq_32(**options) -> PatchVQ:
    return PatchVQ(codebook_size=32, **options)


def test_a_registered_factory_builds_by_name_and_loads_its_weights(tmp_path, images):
    tokenizer = toklip.build_tokenizer("patch_vq_32", code_dim=8)
    assert "patch_vq_32" in toklip.available_tokenizers() and tokenizer.codebook_size == 32 and tokenizer.code_dim == 8
    torch.save(tokenizer.state_dict(), tmp_path / "patch.pt")
    loaded = toklip.build_tokenizer("patch_vq_32", checkpoint=tmp_path / "patch.pt", code_dim=8)
    assert torch.equal(loaded.encode(images).indices, tokenizer.encode(images).indices)
    assert tokenizer_downsample("patch_vq_32") == 8
    with pytest.raises(ValueError, match="already registered"):
        toklip.register_tokenizer(lambda: PatchVQ(), name="patch_vq_32")


def test_a_target_in_the_tokenizer_group_registers_it_by_name_and_checks_its_arguments():
    settings = {"name": "patch_vq_target", "_target_": "test_registry.PatchVQ", "codebook_size": 48, "checkpoint": None}
    assert register_configured_tokenizer(settings) == {"name": "patch_vq_target", "checkpoint": None}
    assert register_configured_tokenizer(settings)["name"] == "patch_vq_target"  # the same again: nothing changes
    assert toklip.build_tokenizer("patch_vq_target").codebook_size == 48
    with pytest.raises(ConfigError, match="does not take these arguments.*codebok_size"):
        register_configured_tokenizer({"name": "patch_typo", "_target_": "test_registry.PatchVQ", "codebok_size": 48})
    with pytest.raises(ConfigError, match="patch_vq_target.*already registered"):
        register_configured_tokenizer({**settings, "codebook_size": 16})
    with pytest.raises(ConfigError, match="unknown key.*tokenizer.codebook_size"):
        register_configured_tokenizer({"name": "llamagen_tiny", "codebook_size": 16})
    typo = {"name": "patch_vq_other", "_target_": "test_registry.PatchVQ", "code_dimension": 8}
    model = {"_target_": "toklip.TokLIPModule", "_recursive_": False, "tokenizer": typo}
    with pytest.raises(ConfigError, match="PatchVQ does not take these arguments.*code_dimension"):
        check_targets({"model": model})  # the preflight asks the module, which asks the tokenizer


def test_toklip_train_runs_a_tokenizer_given_by_target_in_its_config(tiny_teacher_checkpoint, tmp_path):
    overrides = [
        "experiment=tiny", "trainer.max_steps=2", "trainer.enable_progress_bar=false", "data.batch_size_per_device=8",
        "data.synthetic.train_samples=64", "data.synthetic.samples_per_shard=32", "data.synthetic.retrieval_images=8",
        "data.synthetic.zeroshot_classes=[colour]", "data.synthetic.zeroshot_per_class=2", "trainer.val_check_interval=2",
        "tokenizer.name=patch_from_config", "+tokenizer._target_=test_registry.PatchVQ", "+tokenizer.codebook_size=40",
        f"teacher.checkpoint={tiny_teacher_checkpoint}", f"paths.output_dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}",
    ]  # fmt: skip
    metrics = toklip.train(toklip.compose_config("train", overrides))
    assert "val/zeroshot/top1" in metrics
    exported = toklip.load_toklip(tmp_path / "run" / "toklip.safetensors")
    assert isinstance(exported.tokenizer, PatchVQ) and exported.tokenizer.codebook_size == 40


@pytest.mark.parametrize("given", ["name", "_target_"])
def test_a_users_tokenizer_trains_two_steps_and_exports(tiny_teacher_checkpoint, synthetic_set, tmp_path, given):
    tokenizer = {"name": "patch_vq_32"} if given == "name" else {"name": "patch_vq_t", "_target_": "test_registry.PatchVQ", "code_dim": 24}
    module = toklip.TokLIPModule(
        "tiny_64", tokenizer=tokenizer, teacher={"checkpoint": str(tiny_teacher_checkpoint)}, optim={"lr": 1e-3, "warmup_steps": 1}
    )
    assert isinstance(module.model.tokenizer, PatchVQ)
    before = {name: p.detach().clone() for name, p in module.model.trainable_parameters().items()}
    fit = trainer(max_steps=2, callbacks=[toklip.training.ExportModel(str(tmp_path), "toklip.safetensors")])
    fit.fit(module, datamodule(synthetic_set))
    assert fit.global_step == 2
    assert any(not torch.equal(p, before[name]) for name, p in module.model.trainable_parameters().items())
    exported = toklip.load_toklip(tmp_path / "toklip.safetensors")  # rebuilt by the name the export records
    assert isinstance(exported.tokenizer, PatchVQ)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(exported.encode_image(images), module.model.eval().encode_image(images), atol=1e-6)


def test_vq_training_trains_a_users_tokenizer_and_its_export_loads(synthetic_set, tmp_path, images):
    module = toklip.training.VQTrainingModule(
        {"name": "patch_vq_vq", "_target_": "test_registry.PatchVQ", "codebook_size": 16, "checkpoint": None},
        restart_every=0,  # every code unused in a step is re-seeded: the codebook parameter is written
        optim={"lr": 1e-3, "warmup_steps": 1},
    )
    before = {name: p.detach().clone() for name, p in module.vq.named_parameters()}
    fit = trainer(max_steps=2, callbacks=[toklip.training.ExportModel(str(tmp_path), "tokenizer.safetensors")])
    fit.fit(module, datamodule(synthetic_set, batch_size_per_device=4))
    assert all(not torch.equal(p, before[name]) for name, p in module.vq.named_parameters())
    loaded = toklip.build_tokenizer("patch_vq_vq", checkpoint=tmp_path / "tokenizer.safetensors")
    assert torch.equal(loaded.encode(images).indices, module.vq.encode(images).indices)
