import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import toklip
from toklip.checkpoints import CheckpointError, compare_state_dict
from toklip.models.factory import convert_released, convert_teacher, export_toklip, tokenizer_keys_to_ours
from toklip.models.teacher import Teacher, build_open_clip
from toklip.models.token_encoder import CausalSelfAttention

DATA = Path(__file__).parent / "data"


def _layout(name):
    rows = (line.split("\t") for line in (DATA / name).read_text().splitlines() if line)
    return {key: shape for key, shape, *_ in rows}


@pytest.mark.parametrize(
    "preset, keys, trainable",
    [("toklip_s_256", "toklip_so400m_256_keys.tsv", 432_353_216), ("toklip_l_384", "toklip_so400m_384_keys.tsv", 432_721_856)],
)
def test_release_layout_and_trainable_count(preset, keys, trainable):
    with torch.device("meta"):
        model = toklip.build_toklip(preset, init_logit_bias=0.0)
        without_bias = toklip.build_toklip(preset)
    assert {k: str(tuple(v.shape)) for k, v in model.state_dict().items()} == _layout(keys)
    assert "logit_bias" not in without_bias.state_dict()
    visual = sum(p.numel() for n, p in without_bias.trainable_parameters().items() if n.startswith("visual."))
    assert visual == trainable
    assert set(without_bias.trainable_parameters()) - {"logit_scale"} == {
        n for n in without_bias.state_dict() if n.startswith("visual.trunk.") and not n.startswith("visual.trunk.vq.")
    }


def test_512_preset_grid():
    with torch.device("meta"):
        model = toklip.build_toklip("toklip_so400m_512")
    assert model.visual.trunk.grid == (32, 32) and model.visual.trunk.num_tokens == 1024


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return toklip.build_toklip("tiny_64").eval()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_features_are_causal_and_pool_sees_everything(tiny, checkpointing):
    trunk = tiny.visual.trunk
    trunk.gradient_checkpointing = checkpointing
    try:
        h, w = trunk.grid
        codes = tiny.tokenizer.encode(torch.rand(1, 3, 64, 64) * 2 - 1).codes
        row = 3
        changed = codes.clone()
        changed[:, row:] = torch.roll(changed[:, row:], shifts=1, dims=-1)
        with torch.enable_grad():
            before = trunk.features_from_codes(codes)
            after = trunk.features_from_codes(changed)
        delta = (after - before).abs().amax(dim=-1)[0]
        assert torch.all(delta[: row * w] == 0)
        assert torch.all(delta[row * w :] > 0)
        for position in (0, h * w // 2, -1):  # the pool reads every token's features, not the last one's alone
            nudged = before.detach().clone()
            nudged[:, position] += 1
            assert not torch.allclose(trunk.pool(nudged), trunk.pool(before))
    finally:
        trunk.gradient_checkpointing = False


def test_causal_attention_equals_an_explicit_additive_mask():
    attention = CausalSelfAttention(32, heads=4)
    x = torch.randn(2, 10, 32)
    q, k, v = attention.qkv(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    mask = torch.full((10, 10), float("-inf")).triu(1)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + mask, dim=-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)


def test_the_incremental_causal_pass_equals_the_full_forward(tiny):
    indices = tiny.tokenizer.encode(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1).indices.flatten(1)
    with torch.no_grad():
        full = tiny.index_features(indices.view(2, 8, 8))
    one_at_a_time, cache = [], toklip.models.CausalCache()
    for position in range(64):
        one_at_a_time.append(tiny.extend_indices(indices[:, position : position + 1], cache))
    assert cache.length == 64
    torch.testing.assert_close(torch.cat(one_at_a_time, dim=1), full, rtol=0, atol=1e-5)
    chunks, cache = [], toklip.models.CausalCache()
    for start, stop in ((0, 5), (5, 6), (6, 40), (40, 64)):  # a prompt, then steps of any size
        chunks.append(tiny.extend_indices(indices[:, start:stop], cache))
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="64 \\+ 1 tokens exceed the model's 64"):
        tiny.extend_indices(indices[:, :1], cache)


def test_encode_indices_equals_encode_image(tiny):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    indices = tiny.tokenizer.encode(images).indices
    torch.testing.assert_close(tiny.encode_indices(indices), tiny.encode_image(images), rtol=0, atol=1e-5)
    assert tiny.token_features(images).shape == (2, 64, 128)
    trained = toklip.build_toklip("tiny_64").eval()
    with torch.no_grad():  # a trained codebook's rows are not unit-norm; the search and the lookup normalise them
        trained.tokenizer.trainable_codebook().mul_(torch.rand(trained.tokenizer.codebook_size, 1) * 3 + 0.5)
    indices = trained.tokenizer.encode(images).indices
    torch.testing.assert_close(trained.encode_indices(indices), trained.encode_image(images), rtol=0, atol=1e-5)


def test_the_trunk_ends_in_its_layer_norm():
    trunk = toklip.build_toklip("tiny_64").visual.trunk
    with torch.no_grad():
        trunk.norm.weight.fill_(2.0), trunk.norm.bias.fill_(0.5)
        features = trunk.features_from_codes(torch.randn(2, *trunk.grid, trunk.vq.code_dim))
    torch.testing.assert_close(features.mean(-1), torch.full(features.shape[:2], 0.5), rtol=0, atol=1e-4)
    torch.testing.assert_close(features.std(-1, unbiased=False), torch.full(features.shape[:2], 2.0), rtol=0, atol=1e-3)


def test_the_text_embedding_reads_up_to_the_end_of_text_token(tiny):
    tokens = toklip.get_text_tokenizer("tiny_64")(["a red circle", "two blue squares"])
    padded_otherwise = tokens.clone()
    for row, end in enumerate(tokens.argmax(-1).tolist()):  # the end-of-text token has the largest id
        padded_otherwise[row, end + 1 :] = 320 + row
    torch.testing.assert_close(tiny.encode_text(padded_otherwise), tiny.encode_text(tokens), rtol=0, atol=1e-6)


def test_wrong_resolution_is_named(tiny):
    with pytest.raises(ValueError, match=r"token grid \(4, 4\) does not match the model's \(8, 8\) \(images of 64x64 px\)"):
        tiny.encode_image(torch.zeros(1, 3, 32, 32))


def test_text_tower_is_frozen_three_ways(tiny):
    tiny.train()
    try:
        assert tiny.visual.trunk.training and not tiny.text.training and not tiny.tokenizer.training
        assert not any(p.requires_grad for p in tiny.text.parameters())
        tokens = toklip.get_text_tokenizer("tiny_64")(["a red circle"])
        assert not tiny.encode_text(tokens).requires_grad
    finally:
        tiny.eval()


def test_forward_and_text(tiny):
    tokens = toklip.get_text_tokenizer("tiny_64")(["a red circle", "two blue squares"])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.int64
    out = tiny(torch.rand(2, 3, 64, 64) * 2 - 1, tokens)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(10.0)
    assert out["logit_bias"] is None


def test_bf16_autocast_forward_on_cpu(tiny):
    tokens = toklip.get_text_tokenizer("tiny_64")(["a red circle"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(torch.rand(1, 3, 64, 64) * 2 - 1, tokens)
    assert out["image_features"].dtype == torch.bfloat16
    assert torch.isfinite(out["image_features"].float()).all()


def _released_format(model) -> dict:
    """A training checkpoint shaped like TokLIP_S_256.pt: DDP prefixes, numpy optimizer state."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    optimizer = {
        "state": {0: {"step": np.float64(12.0), "exp_avg": torch.zeros(3)}},
        "param_groups": [{"lr": np.float64(1e-5), "betas": (0.9, 0.95), "params": [0]}],
    }
    return {"epoch": 32, "name": "toklip", "state_dict": state, "optimizer": optimizer, "scaler": {"scale": 1024.0}}


def test_released_format_loads_strictly_and_reproduces(tiny, tmp_path):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens = toklip.get_text_tokenizer("tiny_64")(["a", "b"])
    torch.save(_released_format(tiny), tmp_path / "TokLIP_tiny.pt")
    loaded = toklip.load_toklip(tmp_path / "TokLIP_tiny.pt", preset="tiny_64")
    assert not loaded.training and not any(p.requires_grad for p in loaded.text.parameters())
    assert torch.equal(loaded.encode_image(images), tiny.encode_image(images))
    assert torch.equal(loaded.encode_text(tokens), tiny.encode_text(tokens))


def test_malicious_released_checkpoint_is_refused(tiny, tmp_path, malicious_payload):
    payload, marker = malicious_payload
    checkpoint = _released_format(tiny)
    checkpoint["scaler"] = {"scale": np.float64(1.0), "hook": payload}
    torch.save(checkpoint, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        toklip.load_toklip(tmp_path / "evil.pt", preset="tiny_64")
    assert not marker.exists()


def test_wrong_preset_gives_the_report_not_a_partial_load(tmp_path):
    other = toklip.build_toklip("tiny_64", tokenizer="taming_tiny")
    torch.save(_released_format(other), tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as err:
        toklip.load_toklip(tmp_path / "other.pt", preset="tiny_64")
    message = str(err.value)
    assert "missing from the checkpoint: visual.trunk.vq.quantize.codebook_used" in message
    assert "visual.trunk.vq_table.weight (model (512, 8), checkpoint (512, 32))" in message


def test_export_and_convert_round_trip(tiny, tmp_path):
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.save(_released_format(tiny), tmp_path / "released.pt")
    out = convert_released(tmp_path / "released.pt", "tiny_64", tmp_path / "export" / "tiny.safetensors")
    assert (tmp_path / "export" / "tiny.json").is_file()
    loaded = toklip.load_toklip(out)  # the architecture comes from the JSON sidecar
    assert torch.equal(loaded.encode_image(images), tiny.encode_image(images))
    with pytest.raises(ValueError, match="does not fit preset 'toklip_s_256'"):
        convert_released(tmp_path / "released.pt", "toklip_s_256", tmp_path / "x.safetensors")
    export_toklip(tiny.state_dict(), toklip.models.preset("tiny_64"), tmp_path / "direct.safetensors")
    assert torch.equal(toklip.load_toklip(tmp_path / "direct.safetensors").encode_image(images), tiny.encode_image(images))


def test_build_toklip_encoder_keeps_the_reference_signature(tiny, tmp_path):
    torch.save(_released_format(tiny), tmp_path / "tiny.pt")
    assert not toklip.build_toklip_encoder("tiny_64", 64, tmp_path / "tiny.pt").training
    with pytest.raises(ValueError, match="256 px model, not 384 px"):
        toklip.build_toklip_encoder("ViT-SO400M-16-SigLIP2-256-toklip", 384, tmp_path / "tiny.pt")


def test_teacher_init_report(tmp_path):
    teacher_state = build_open_clip("tiny_teacher_64").state_dict()
    student = toklip.build_toklip("tiny_64")
    report = toklip.init_from_teacher(student, teacher_state)
    assert report.left_at_init == [
        "visual.trunk.vq_mapping.bias",
        "visual.trunk.vq_mapping.weight",
        "visual.trunk.vq_table.bias",
        "visual.trunk.vq_table.weight",
    ]
    assert sorted(k for k, _ in report.skipped) == ["visual.trunk.patch_embed.proj.bias", "visual.trunk.patch_embed.proj.weight"]
    assert "logit_scale" in report.copied and "text.token_embedding.weight" in report.copied
    for key in ("visual.trunk.blocks.0.attn.qkv.weight", "visual.trunk.attn_pool.latent", "text.ln_final.weight"):
        assert torch.equal(student.state_dict()[key], teacher_state[key])


def test_teacher_init_fails_on_a_backbone_mismatch():
    teacher_state = build_open_clip("tiny_teacher_64").state_dict()
    with torch.device("meta"):
        student = toklip.build_toklip("tiny_64", backbone="vit_b16", text="siglip2_so400m")
    with pytest.raises(CheckpointError, match="no transformer block could be copied"):
        toklip.init_from_teacher(student, teacher_state)


def test_teacher_is_frozen_and_resizes(tmp_path):
    clip = build_open_clip("tiny_teacher_64")
    teacher = Teacher("tiny_teacher_64", clip.state_dict())
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = clip.visual.eval()(F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False))
    torch.testing.assert_close(teacher(images), expected)


def test_teacher_weights_file_is_converted_and_missing_weights_are_named(tmp_path):
    clip = build_open_clip("tiny_teacher_64")
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, tmp_path / "epoch_3.pt")
    out = convert_teacher("tiny_teacher_64", tmp_path / "epoch_3.pt", tmp_path / "teacher.safetensors")
    assert set(toklip.checkpoints.read_checkpoint(out)) == set(clip.state_dict())
    with pytest.raises(CheckpointError, match="set teacher.pretrained to a local open_clip weights file"):
        convert_teacher("ViT-SO400M-16-SigLIP2-256", None, tmp_path / "t.safetensors")


def test_siglip_text_tokenizer_offline_error(monkeypatch):
    asked = {}

    def from_pretrained(name, **options):  # what transformers is asked for, with or without HF_HUB_OFFLINE
        asked.update(options, name=name)
        raise OSError("not in the cache")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", from_pretrained)
    with pytest.raises(FileNotFoundError, match=r"'timm/ViT-SO400M-16-SigLIP2-256' .* \(nothing is downloaded\); pass tokenizer_path="):
        toklip.get_text_tokenizer("toklip_s_256")
    assert asked["name"] == "timm/ViT-SO400M-16-SigLIP2-256" and asked["local_files_only"] is True


def test_siglip_text_tokenizer_reads_a_local_copy(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3, "red": 4, "circle": 5}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    tokens = toklip.get_text_tokenizer("toklip_s_256", tokenizer_path=tmp_path)(["a red circle"])
    assert tokens.shape == (1, 64) and tokens[0, :4].tolist() == [3, 4, 5, 0]  # SigLIP2's 64 tokens, padded


def test_teacher_weights_are_found_in_an_existing_hf_cache(tmp_path):
    from toklip.models.teacher import find_teacher_weights

    repo = tmp_path / "models--timm--ViT-SO400M-16-SigLIP2-256"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"")
    found = find_teacher_weights("ViT-SO400M-16-SigLIP2-256", None, cache_dir=tmp_path)
    assert found == snapshot / "open_clip_model.safetensors"


def test_toklips_timm_models_carry_its_prefix():
    import timm

    ours = set(timm.list_models("*tiny_patch*_siglip_*"))
    assert {"toklip_vit_tiny_patch8_siglip_64", "toklip_vit_tiny_patch4_siglip_32"} <= ours
    assert all(name.startswith("toklip_") for name in ours)  # nothing that could pass for one of timm's own


def test_toklip_xl_512_reads_its_tokenizer_in_seed_vokens_names_and_reports_every_misfit():
    # TokLIP-XL's release has no config: its inferred layout is the S/L one with an IBQ-262144 tokenizer
    # under visual.trunk.vq., in SEED-Voken's (taming's) key names.
    from test_tokenizers import _to_taming_layout

    with torch.device("meta"):
        model = toklip.build_toklip("toklip_xl_512")
    ours = model.state_dict()
    tokenizer = {k.removeprefix("visual.trunk.vq."): v for k, v in ours.items() if k.startswith("visual.trunk.vq.")}
    released = {k: v for k, v in ours.items() if not k.startswith("visual.trunk.vq.")}
    released |= {f"visual.trunk.vq.{k}": v for k, v in _to_taming_layout(tokenizer, levels=5).items()}
    assert "visual.trunk.vq.encoder.down.4.attn.3.q.weight" in released and released["visual.trunk.vq.quantize.embedding.weight"].shape == (
        262144,
        256,
    )
    converted, ignored = tokenizer_keys_to_ours(model, released)
    assert compare_state_dict(model, converted).ok and ignored == []
    del released["visual.trunk.vq.decoder.up.0.block.4.conv2.bias"], released["logit_scale"]
    released["visual.trunk.vq.loss.discriminator.main.0.weight"] = torch.empty(64, 3, 4, 4, device="meta")
    converted, ignored = tokenizer_keys_to_ours(model, released)
    report = compare_state_dict(model, converted)
    report.ignored = ignored
    assert set(report.missing) == {"logit_scale", "visual.trunk.vq.decoder.conv_blocks.4.res.4.conv2.bias"}
    assert ignored == ["visual.trunk.vq.loss.discriminator.main.0.weight"]
    assert "visual.trunk.vq.decoder.conv_blocks.4.res.4.conv2.bias" in report.describe() and "more" not in report.describe()
