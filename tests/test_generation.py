"""The generator over VQ indices: teacher forcing equals the incremental path, guidance, overfitting; the
class-conditional pipeline from a labelled cache to scored images; the sample scores."""

import json

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
    with torch.random.fork_rng():
        torch.manual_seed(0)
        dropped = model.drop_condition(torch.zeros(10_000, dtype=torch.long), 0.3) == 5
    assert 0.28 < dropped.float().mean() < 0.32  # a draw a row: 0.3 of them (bounds 4 standard deviations wide)
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


# ---- class-conditional, end to end: a labelled cache, toklip-train model=generator, toklip-generate ----------

COLOURS = ((220, 40, 40), (40, 170, 60), (40, 70, 220), (240, 220, 40))  # class c: a square of colour c


def write_labelled_shards(root, per_class: int = 8):
    """ImageNet-style shards: <key>.jpg and <key>.cls, no captions; and the same images as class folders."""
    import io

    import webdataset as wds
    from PIL import Image

    root.mkdir(parents=True)
    rng = torch.Generator().manual_seed(0)
    with wds.ShardWriter(str(root / "%06d.tar"), maxcount=16) as sink:
        for number in range(per_class * len(COLOURS)):
            label = number % len(COLOURS)
            image = Image.new("RGB", (64, 64), (128, 128, 128))
            left, top = torch.randint(0, 32, (2,), generator=rng).tolist()
            image.paste(COLOURS[label], (left, top, left + 32, top + 32))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG")
            sink.write({"__key__": f"{number:05d}", "jpg": buffer.getvalue(), "cls": str(label).encode()})
            (root / "reference").mkdir(exist_ok=True)
            image.save(root / "reference" / f"{number:05d}.png")
    return root


def compose(name: str, run_dir, overrides):
    from omegaconf import open_dict

    cfg = toklip.compose_config(name, ["experiment=tiny", "trainer.enable_progress_bar=false", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def test_class_conditional_generation_from_a_labelled_cache_to_scored_images(frozen_parts, tmp_path):
    from hydra.utils import instantiate

    from toklip.config import ConfigError
    from toklip.generation import load_generator
    from toklip.tasks import cache, generate, train

    shards = write_labelled_shards(tmp_path / "shards")
    data = ["data=webdataset", f"data.train_urls={shards}/*.tar", "data.train_num_samples=32", *frozen_parts[2]]
    cache_cfg = compose(
        "cache", tmp_path / "cache_run", [*data, "captions=false", "labels=true", "views=1", "num_workers=0", "batch_size=16",
                                          f"output={tmp_path / 'cache'}"],
    )  # fmt: skip
    assert cache(cache_cfg)["encoded"] == 32
    export = instantiate(cache_cfg.model, _convert_="all").export(tmp_path / "toklip.safetensors")  # the same VQ as the cache's
    run = [
        "model=generator", "data=cache", "eval=none", f"data.train_urls={tmp_path / 'cache'}/*.tar",
        "data.num_workers=0", "data.batch_size_per_device=8", "trainer.max_steps=3", f"model.toklip={export}",
        "model.input_mode=codes+toklip",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="needs caption embeddings"):  # a text-conditional model on a captionless cache
        train(compose("train", tmp_path / "text_run", run))
    metrics = train(compose("train", tmp_path / "run", [*run, "model.condition=class", "model.num_classes=4"]))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    generator, toklip_path = load_generator(tmp_path / "run" / "generator.safetensors")
    assert generator.num_classes == 4 and generator.input_mode == "codes+toklip" and toklip_path == str(export.resolve())

    classnames = tmp_path / "classnames.txt"
    classnames.write_text("red\ngreen\nblue\nyellow\n")
    generate_cfg = [
        f"checkpoint={tmp_path / 'run' / 'generator.safetensors'}", "classes=[0,3]", "samples_per_condition=2",
        f"score.reference={shards / 'reference'}", f"score.classnames={classnames}", f"out={tmp_path / 'samples'}",
    ]  # fmt: skip
    scores = generate(compose("generate", tmp_path / "gen", generate_cfg))
    assert scores["fd"] > 0 and 0 <= scores["zeroshot_accuracy"] <= 1
    records = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert [r["condition"] for r in records] == ["class 0", "class 0", "class 3", "class 3"]
    assert all((tmp_path / "samples" / r["file"]).is_file() for r in records)
    from PIL import Image

    assert Image.open(tmp_path / "samples" / "grid.png").size == (2 + 2 * 66, 2 + 2 * 66)  # 2 x 2 images of 64 px
    again = generate(compose("generate", tmp_path / "gen", [*generate_cfg, f"out={tmp_path / 'again'}"]))
    assert again == scores  # the same seed draws the same images
    with pytest.raises(ConfigError, match="holds an earlier run's samples"):
        generate(compose("generate", tmp_path / "gen", generate_cfg))  # they would mix with this run's
    fresh = [o for o in generate_cfg if not o.startswith(("out=", "score.classnames="))] + [f"out={tmp_path / 'refused'}"]
    two = tmp_path / "two_names.txt"
    two.write_text("red\ngreen\n")
    from toklip.models.factory import export_toklip
    from toklip.models.presets import preset

    torch.manual_seed(1)
    other = export_toklip(toklip.build_toklip("tiny_64").state_dict(), preset("tiny_64"), tmp_path / "other" / "toklip.safetensors")
    refusals = {  # each before anything is drawn
        "class-conditional": ["classes=[]", "prompts=[a red square]"],
        "outside 0..3": ["classes=[4]"],
        r"class ids \[1.5\] are not integers": ["classes=[1.5]"],
        r"sampling.top_p=1.5: expected a value in \(0, 1\]": ["sampling.top_p=1.5"],
        "sampling.temperature=0": ["sampling.temperature=0"],
        "samples_per_condition=0: expected 1 or more": ["samples_per_condition=0"],
        "score.reference=.*nowhere: not a folder": [f"score.reference={tmp_path / 'nowhere'}"],
        "names 2 classes; the generator has 4": [f"score.classnames={two}"],
        r"was trained on another TokLIP model \(codebook SHA-256 \w+ there, \w+ here\)": [f"toklip={other}"],
    }
    for problem, overrides in refusals.items():
        with pytest.raises(ConfigError, match=problem):
            generate(compose("generate", tmp_path / "gen", [*fresh, *overrides]))
    assert not (tmp_path / "refused").exists()


def test_frechet_distance_and_clip_score_in_a_supplied_feature_space():
    from toklip.generation.evaluation import SampleScorer, clip_score

    class MeanColour(torch.nn.Module):  # a feature space: each channel's mean and spread
        def encode_image(self, images):
            return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)

    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 16, 16, generator=g)
    scorer = SampleScorer(MeanColour(), None, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert abs(scorer.frechet_distance(real, real)) < 1e-6
    assert scorer.frechet_distance(real, real * 0.5) > scorer.frechet_distance(real, real * 0.9) > 0
    image, text = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(clip_score(image.expand(2, 2), text), torch.tensor([100 / 2**0.5, 0.0]))


def test_the_scorer_classifies_and_scores_each_sample_against_its_own_prompt():
    """A model whose image embedding is the normalised image's mean colour and whose text embedding is the
    colour a prompt names: each score and prediction is worked out by hand."""
    from toklip.generation.evaluation import SampleScorer

    colours = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
    names = list(colours)

    class ColourModel(torch.nn.Module):
        def encode_image(self, images):
            return images.mean((2, 3))

        def encode_text(self, tokens, normalize=False):
            features = torch.tensor(list(colours.values()))[tokens]
            return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def tokenizer(texts):  # a prompt's token: the colour it names
        return torch.tensor([next(i for i, name in enumerate(names) if name in text.split()) for text in texts])

    def solid(*rgb):
        return torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, 16, 16)

    red, green, blue, yellow = (solid(*rgb) for rgb in colours.values())
    scorer = SampleScorer(ColourModel(), tokenizer, 16, (0.5,) * 3, (0.5,) * 3)
    # Normalised, red is (1, -1, -1): cosine 1/sqrt(3) with the red prompt, and below 0 with green's.
    scores = scorer.clip_scores(torch.cat([red, green]), ["a red square", "a green square"])
    torch.testing.assert_close(scores, torch.full((2,), 100 / 3**0.5))
    torch.testing.assert_close(scorer.clip_scores(torch.cat([red, green]), ["a green square", "a red square"]), torch.zeros(2))
    images, templates = torch.cat([red, red, green, blue, yellow]), [lambda c: f"a {c} square", lambda c: f"{c}"]
    assert scorer.zeroshot_predictions(images, names, templates).tolist() == [0, 0, 1, 2, 3]
    assert scorer.zeroshot_accuracy(images, torch.tensor([0, 0, 1, 2, 3]), names, templates) == 1.0
    assert scorer.zeroshot_accuracy(images, torch.tensor([0, 1, 1, 2, 0]), names, templates) == pytest.approx(0.6)


def test_fsdp2_shards_the_generator_and_exports_it_whole(tiny_toklip, tmp_path, run_on_two_ranks):
    from toklip.generation import load_generator
    from toklip.models.factory import export_toklip
    from toklip.models.presets import preset

    export = export_toklip(tiny_toklip.state_dict(), preset("tiny_64"), tmp_path / "toklip.safetensors")
    stdout, reports = run_on_two_ranks(f"""
        import lightning as L, torch
        from torch.distributed.fsdp import FSDPModule
        from toklip.generation import GeneratorModule
        from toklip.training import ExportModel
        from toklip.training.strategies import fsdp2
        g = torch.Generator().manual_seed(0)
        batches = [{{"indices": torch.randint(0, 1024, (4, 8, 8), generator=g), "label": torch.randint(0, 3, (4,), generator=g)}}
                   for _ in range(2)]
        torch.manual_seed(0)  # as `train` seeds every rank: one initial model
        m = GeneratorModule({str(export)!r}, condition="class", num_classes=3, input_mode="codes+toklip",
                            optim={{"lr": 1e-3, "warmup_steps": 1, "total_steps": 2}})
        t = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy=fsdp2(data_parallel_size=2), logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, callbacks=[ExportModel({str(tmp_path)!r}, "generator.safetensors")])
        before = float(m.generator.backbone.layers[0].self_attn.q_proj.weight.detach().double().sum())
        t.fit(m, torch.utils.data.DataLoader(batches, batch_size=None))
        layer = m.generator.backbone.layers[0].self_attn.q_proj.weight
        after = float(layer.full_tensor().detach().double().sum())
        print(f"rank {{t.global_rank}} steps {{t.global_step}} sharded {{type(layer).__name__}}")
        report = [isinstance(m.generator.backbone.layers[0], FSDPModule), before, after]
    """)
    assert "rank 0 steps 2 sharded DTensor" in stdout and "rank 1 steps 2 sharded DTensor" in stdout
    assert reports[0] == reports[1] and reports[0][0] is True  # each layer its own FSDP2 unit; one model on both ranks
    before, after = reports[0][1:]
    assert abs(after - before) > 1e-3  # it trained
    generator, _ = load_generator(tmp_path / "generator.safetensors")  # gathered from the shards, whole
    exported = generator.backbone.layers[0].self_attn.q_proj.weight
    assert exported.shape == (128, 128) and generator.num_classes == 3
    assert float(exported.double().sum()) == pytest.approx(after, abs=1e-6)


def test_a_class_id_is_read_from_cls_and_a_sample_without_one_is_skipped_as_no_label():
    from toklip.data.samples import SkippedSample, label_of

    assert label_of({"cls": b"207"}) == 207 and label_of({"cls": "3"}) == 3
    with pytest.raises(SkippedSample, match="no_label: no cls"):
        label_of({"jpg": b""})
    with pytest.raises(SkippedSample, match="no_label: cls b'dog'"):
        label_of({"cls": b"dog"})
