"""The generator over VQ indices: teacher forcing equals the incremental path, guidance, overfitting."""

import pytest
import torch

import toklip
from toklip.generation import TokenGenerator


@pytest.fixture(scope="module")
def tiny_toklip():
    torch.manual_seed(0)
    return toklip.build_toklip("tiny_64").eval()


def generator(mode: str = "codes", condition: str = "class", **options) -> TokenGenerator:
    torch.manual_seed(0)
    sizes = {"num_classes": 5} if condition == "class" else {"text_width": 12, "prefix_tokens": 3}
    return TokenGenerator("tiny", codebook_size=1024, num_tokens=64, input_mode=mode, toklip_width=128, **sizes, **options).eval()


def conditions(kind: str, batch: int = 3) -> torch.Tensor:
    if kind == "class":
        return torch.tensor([0, 4, 2])[:batch]
    prompts = torch.randn(batch, 12, generator=torch.Generator().manual_seed(5))
    prompts[1] = float("nan")  # no prompt: the null condition
    return prompts


@pytest.mark.parametrize("mode, condition", [("codes", "class"), ("codes+toklip", "class"), ("codes+toklip", "text")])
def test_teacher_forced_logits_equal_the_incremental_cached_path(tiny_toklip, mode, condition):
    model = generator(mode, condition)
    indices = torch.randint(0, 1024, (3, 64), generator=torch.Generator().manual_seed(1))
    features = tiny_toklip.index_features(indices.view(3, 8, 8)).detach()
    with torch.no_grad():
        forced = model(indices, conditions(condition), features if mode == "codes+toklip" else None)
    stream = model.stream(conditions(condition), tiny_toklip)
    incremental = []
    for position in range(64):
        incremental.append(stream.logits)
        if position < 63:
            stream.advance(indices[:, position : position + 1])
    assert forced.shape == (3, 64, 1024)
    torch.testing.assert_close(torch.stack(incremental, dim=1), forced, rtol=0, atol=1e-4)


def test_guidance_at_scale_one_samples_as_the_conditional_model(tiny_toklip):
    model = generator("codes+toklip")
    plain = model.generate(conditions("class"), toklip=tiny_toklip, generator=torch.Generator().manual_seed(3), top_k=50)
    guided = model.generate(
        conditions("class"), toklip=tiny_toklip, guidance_scale=1.0, generator=torch.Generator().manual_seed(3), top_k=50
    )
    other = model.generate(
        conditions("class"), toklip=tiny_toklip, guidance_scale=4.0, generator=torch.Generator().manual_seed(3), top_k=50
    )
    assert plain.shape == (3, 64) and torch.equal(plain, guided) and not torch.equal(plain, other)


def test_dropping_the_condition_uses_the_null_one():
    model = generator()
    assert torch.equal(model.drop_condition(torch.tensor([0, 1, 2]), 1.0), torch.tensor([5, 5, 5]))
    assert torch.equal(model.drop_condition(torch.tensor([0, 1, 2]), 0.0), torch.tensor([0, 1, 2]))
    text = generator(condition="text")
    assert text.drop_condition(torch.zeros(2, 12), 1.0).isnan().all()


def test_a_tiny_generator_overfits_one_batch_and_then_samples_it():
    torch.manual_seed(0)
    model = TokenGenerator("tiny", codebook_size=16, num_tokens=16, num_classes=4).train()
    indices = torch.randint(0, 16, (4, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.arange(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model.loss(indices, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    sampled = model.eval().generate(labels, top_k=1)  # greedy
    assert torch.equal(sampled, indices)


def test_wrong_settings_are_named():
    with pytest.raises(ValueError, match="input_mode='pixels'"):
        generator("pixels")
    with pytest.raises(ValueError, match="one of them"):
        TokenGenerator("tiny", codebook_size=8, num_tokens=4)
    with pytest.raises(ValueError, match="needs the TokLIP model"):
        generator("codes+toklip").generate(conditions("class"))


def test_the_module_trains_from_cache_batches_and_checkpoints_the_generator_alone(tiny_toklip, tmp_path):
    import lightning as L

    from toklip.generation import GeneratorModule
    from toklip.models.factory import export_toklip
    from toklip.models.presets import preset

    export = export_toklip(tiny_toklip.state_dict(), preset("tiny_64"), tmp_path / "toklip.safetensors")
    g = torch.Generator().manual_seed(4)
    batches = [
        {
            "indices": torch.randint(0, 1024, (4, 8, 8), generator=g),
            "text_features": torch.nn.functional.normalize(torch.randn(4, 128, generator=g), dim=-1),
        }
        for _ in range(3)
    ]
    module = GeneratorModule(export, input_mode="codes+toklip", prefix_tokens=2)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    before = module.generator.head.weight.clone()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert not torch.equal(module.generator.head.weight, before) and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.equal(module.toklip.visual.trunk.pos_embed, tiny_toklip.visual.trunk.pos_embed)  # frozen
    trainer.save_checkpoint(tmp_path / "gen.ckpt")
    saved = torch.load(tmp_path / "gen.ckpt", weights_only=True)["state_dict"]
    assert saved and all(key.startswith("generator.") for key in saved)
    restored = GeneratorModule.load_from_checkpoint(tmp_path / "gen.ckpt", weights_only=True)
    assert torch.equal(restored.generator.head.weight, module.generator.head.weight)
    samples = restored.generator.eval().generate(batches[0]["text_features"][:2], toklip=restored.toklip, guidance_scale=2.0)
    assert samples.shape == (2, 64) and tiny_toklip.tokenizer.decode(samples.view(2, 8, 8)).shape == (2, 3, 64, 64)
