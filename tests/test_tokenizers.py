import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import toklip
from toklip.checkpoints import compare_state_dict
from toklip.tokenizers.base import nearest_code
from toklip.tokenizers.ibq import best_dot_product_codes

DATA = Path(__file__).parent / "data"


def _reference_layout(name: str) -> dict[str, str]:
    rows = (line.split("\t") for line in (DATA / name).read_text().splitlines() if line and not line.startswith("#"))
    return {key: shape for key, shape, *_ in rows}


def test_llamagen_vq16_layout_is_the_release_layout():
    with torch.device("meta"):
        tokenizer = toklip.build_tokenizer("llamagen_vq16")
    ours = {k: str(tuple(v.shape)) for k, v in tokenizer.state_dict().items()}
    assert ours == _reference_layout("llamagen_vq16_keys.tsv")
    assert sum(p.numel() for p in tokenizer.parameters()) == 71_883_403


@pytest.mark.parametrize(
    "name, downsample, codebook, code_dim",
    [
        ("llamagen_vq16", 16, 16384, 8),
        ("llamagen_vq8", 8, 16384, 8),
        ("llamagen_tiny", 8, 1024, 8),
        ("llamagen_tiny_f4", 4, 4096, 32),
        ("taming_f16_16384", 16, 16384, 256),
        ("taming_f16_1024", 16, 1024, 256),
        ("taming_f8_16384", 8, 16384, 4),
        ("taming_tiny", 8, 256, 32),
    ],
)
def test_registered_tokenizers(name, downsample, codebook, code_dim):
    assert name in toklip.available_tokenizers()
    with torch.device("meta"):
        tokenizer = toklip.build_tokenizer(name)
    assert (tokenizer.downsample, tokenizer.codebook_size, tokenizer.code_dim) == (downsample, codebook, code_dim)


def test_vq16_grids_and_real_encode_at_256():
    tokenizer = toklip.build_tokenizer("llamagen_vq16")
    assert tokenizer.grid(256) == (16, 16)
    assert tokenizer.grid(384) == (24, 24)
    assert tokenizer.grid((512, 256)) == (32, 16)
    encoding = tokenizer.encode(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert encoding.indices.shape == (1, 16, 16) and encoding.indices.dtype == torch.int64
    assert encoding.codes.shape == (1, 16, 16, 8)


def test_norm_groups_is_the_group_count_of_every_group_norm():
    from toklip.tokenizers.conv_vq import ConvVQConfig, ConvVQModel

    def group_counts(model):
        return {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}

    narrow = ConvVQConfig(codebook_size=16, base_channels=16, channel_mult=(1, 2), encoder_res_blocks=1, z_channels=16, norm_groups=4)
    assert group_counts(ConvVQModel(narrow)) == {4}
    assert group_counts(toklip.build_tokenizer("llamagen_tiny")) == {32}
    # 0 groups: no normalisation at all, and no norm weights in the state dict
    plain = toklip.build_tokenizer("llamagen_tiny_f4")
    assert group_counts(plain) == set() and not any("norm" in key for key in plain.state_dict())


@pytest.mark.parametrize("name", ["llamagen_tiny", "llamagen_tiny_f4", "taming_tiny"])
def test_encode_lookup_decode(name, images):
    tokenizer = toklip.build_tokenizer(name)
    encoding = tokenizer.encode(images)
    side = 64 // tokenizer.downsample
    assert encoding.indices.shape == (2, side, side)
    assert encoding.codes.shape == (2, side, side, tokenizer.code_dim)
    assert int(encoding.indices.min()) >= 0 and int(encoding.indices.max()) < tokenizer.codebook_size
    # lookup gives the same vectors from indices alone (the straight-through form rounds once)
    torch.testing.assert_close(tokenizer.lookup(encoding.indices), encoding.codes, rtol=0, atol=1e-6)
    decoded = tokenizer.decode(encoding.indices)  # the decoder's image of the codes, clamped to [-1, 1]
    expected = tokenizer.decode_latents(encoding.codes.permute(0, 3, 1, 2)).clamp(-1, 1)  # codes differ from lookup's by 1e-6
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-4)
    assert decoded.shape == images.shape and not torch.equal(decoded, tokenizer.decode(encoding.indices.flip(-1)))


def test_llamagen_codes_have_unit_norm(images):
    codes = toklip.build_tokenizer("llamagen_tiny").encode(images).codes
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(codes.shape[:-1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llamagen_tiny", "taming_tiny"])
def test_indices_are_the_nearest_codes(name, images):
    tokenizer = toklip.build_tokenizer(name)
    encoding = tokenizer.encode(images)
    latents = tokenizer.latents(images).permute(0, 2, 3, 1).reshape(-1, tokenizer.code_dim)
    if tokenizer.l2_normalized:  # LlamaGen searches unit-norm latents among unit-norm codes
        latents = torch.nn.functional.normalize(latents, dim=-1)
    brute_force = torch.cdist(latents, tokenizer.codebook()).argmin(dim=1)
    assert torch.equal(brute_force, encoding.indices.flatten())


def test_chunked_code_search_is_bit_identical_to_the_release_formula():
    vectors, codebook = torch.randn(1000, 8), torch.randn(4096, 8)
    codebook[7] = codebook[3]  # an exact tie resolves to the lower index, as argmin over the whole row does
    vectors[0] = codebook[3]
    distances = vectors.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2 * torch.einsum("nc,ck->nk", vectors, codebook.t())
    indices = nearest_code(vectors, codebook)  # 64 rows a chunk here
    assert torch.equal(indices, distances.argmin(dim=1)) and indices[0] == 3
    assert nearest_code(vectors[:0], codebook).shape == (0,)


def test_frozen_three_ways(images):
    tokenizer = toklip.build_tokenizer("llamagen_tiny")
    parent = nn.ModuleDict({"vq": tokenizer, "head": nn.Linear(2, 2)})
    parent.train()
    assert not tokenizer.training and all(not m.training for m in tokenizer.modules())
    assert parent["head"].training
    assert not any(p.requires_grad for p in tokenizer.parameters())
    assert not tokenizer.encode(images.requires_grad_()).codes.requires_grad


def test_encode_ignores_autocast(images):
    tokenizer = toklip.build_tokenizer("llamagen_tiny")
    reference = tokenizer.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = tokenizer.encode(images)
    assert torch.equal(reference.indices, under_autocast.indices)
    assert under_autocast.codes.dtype == torch.float32


def test_bad_images_are_rejected():
    tokenizer = toklip.build_tokenizer("llamagen_tiny")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tokenizer.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="multiple of the tokenizer's downsample factor 8"):
        tokenizer.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        tokenizer.lookup(torch.full((1, 2, 2), 1024))


def test_unknown_names_and_overrides():
    with pytest.raises(KeyError, match="available: .*llamagen_vq16"):
        toklip.build_tokenizer("llamagen_vq32")
    with pytest.raises(TypeError, match="codebook_sise"):
        toklip.build_tokenizer("llamagen_tiny", codebook_sise=12)
    assert toklip.build_tokenizer("llamagen_tiny", codebook_size=512).codebook_size == 512


# --- checkpoint formats -------------------------------------------------------------------


def _save_formats(state_dict: dict, folder: Path) -> dict[str, Path]:
    paths = {}
    for key in ("ema", "model", "state_dict"):
        paths[key] = folder / f"{key}.pt"
        torch.save({key: state_dict, "steps": 10, "args": argparse.Namespace(vq_model="VQ-16")}, paths[key])
    paths["bare"] = folder / "bare.pt"
    torch.save(state_dict, paths["bare"])
    paths["safetensors"] = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, paths["safetensors"])
    return paths


def test_every_llamagen_format_loads_strictly_and_encodes_identically(tmp_path, images):
    source = toklip.build_tokenizer("llamagen_tiny")
    expected = source.encode(images)
    for fmt, path in _save_formats(source.state_dict(), tmp_path).items():
        loaded = toklip.build_tokenizer("llamagen_tiny", checkpoint=path)
        encoding = loaded.encode(images)
        assert torch.equal(encoding.indices, expected.indices), fmt
        assert torch.equal(encoding.codes, expected.codes), fmt


def test_ema_weights_win_over_model_weights(tmp_path, images):
    ema, model = toklip.build_tokenizer("llamagen_tiny"), toklip.build_tokenizer("llamagen_tiny")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, tmp_path / "both.pt")
    loaded = toklip.build_tokenizer("llamagen_tiny", checkpoint=tmp_path / "both.pt")
    assert torch.equal(loaded.encode(images).codes, ema.encode(images).codes)


def _to_taming_layout(state_dict: dict, levels: int) -> dict:
    """Our keys renamed the way taming-transformers names them (the inverse of the loader's map)."""
    import re

    middle = {"0": "block_1", "1": "attn_1", "2": "block_2"}
    renamed = {}
    for key, tensor in state_dict.items():
        key = re.sub(r"^(encoder|decoder)\.mid\.(\d)\.", lambda m: f"{m[1]}.mid.{middle[m[2]]}.", key)
        key = re.sub(r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block.", key)
        key = re.sub(r"^encoder\.conv_blocks\.", "encoder.down.", key)
        key = re.sub(
            r"^decoder\.conv_blocks\.(\d+)\.(res|attn|upsample)\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'res' else m[2]}.",
            key,
        )
        renamed[key] = tensor
    return renamed


def test_taming_lightning_checkpoint_loads_and_reports_ignored_loss_keys(tmp_path, images):
    source = toklip.build_tokenizer("taming_tiny")
    taming_state = _to_taming_layout(source.state_dict(), levels=4)
    assert "encoder.down.0.block.0.conv1.weight" in taming_state
    assert "decoder.up.3.attn.0.q.weight" in taming_state  # lowest resolution is the last `up`
    taming_state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    taming_state["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    torch.save({"epoch": 3, "global_step": 100, "state_dict": taming_state}, tmp_path / "last.ckpt")

    loaded = toklip.build_tokenizer("taming_tiny")
    report = loaded.load_weights(tmp_path / "last.ckpt")
    assert sorted(report.ignored) == ["loss.discriminator.main.0.weight", "loss.perceptual_loss.lin0.model.1.weight"]
    assert torch.equal(loaded.encode(images).indices, source.encode(images).indices)


# ---- IBQ (SEED-Voken) ----------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.strip("()").split(",") if n.strip())


@pytest.mark.parametrize("codes", [1024, 8192, 16384, 262144])
def test_ibq_reads_seed_vokens_lightning_layout(codes):
    # SEED-Voken's keys (tests/data, from its configs/IBQ/gpu config), with their EMA shadows and loss keys.
    generator = {key: _shape(shape) for key, shape in _reference_layout("ibq_262144_keys.tsv").items()}
    generator["quantize.embedding.weight"] = (codes, 256)
    with torch.device("meta"):
        tokenizer = toklip.build_tokenizer(f"ibq_{codes}")
        checkpoint = {key: torch.empty(shape) for key, shape in generator.items()}
        checkpoint |= {f"model_ema.{key.replace('.', '')}": torch.empty(shape) for key, shape in generator.items()}
        checkpoint |= {"model_ema.decay": torch.empty(()), "model_ema.num_updates": torch.empty(())}
        checkpoint |= {key: torch.empty(_shape(shape)) for key, shape in _reference_layout("ibq_loss_keys.tsv").items()}
    converted, ignored = tokenizer.convert_state_dict(checkpoint)
    report = compare_state_dict(tokenizer, converted)
    assert report.ok, str(report)
    assert {key for key in ignored if key.startswith("loss.")} == set(_reference_layout("ibq_loss_keys.tsv"))
    assert sum(p.numel() for p in tokenizer.parameters()) == 106_787_715 + codes * 256  # the reference's count
    assert tokenizer.downsample == 16 and tokenizer.grid(512) == (32, 32)


def _seed_voken_checkpoint(tokenizer, ema_noise: float, path) -> dict:
    """`tokenizer`'s weights saved as SEED-Voken's IBQ saves them: taming names, EMA shadows (the weights
    plus noise), loss keys. Returns the EMA weights in toklip's names."""
    raw = {key: value.clone() for key, value in tokenizer.state_dict().items()}
    ema = {key: value + ema_noise * torch.randn_like(value) for key, value in raw.items()}
    state = _to_taming_layout(raw, levels=len(tokenizer.config.channel_mult))
    ema_named = _to_taming_layout(ema, levels=len(tokenizer.config.channel_mult))
    state |= {f"model_ema.{key.replace('.', '')}": value for key, value in ema_named.items()}
    state |= {"model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(-1, dtype=torch.int32)}
    state |= {
        "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4),
        "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1),
    }
    torch.save({"epoch": 1, "global_step": 10, "state_dict": state}, path)
    return ema


def test_ibq_checkpoint_loads_its_ema_weights_and_reports_what_it_drops(tmp_path, images, caplog):
    source = toklip.build_tokenizer("ibq_tiny")
    ema = _seed_voken_checkpoint(source, ema_noise=0.02, path=tmp_path / "ibq.ckpt")
    with caplog.at_level("INFO", logger="toklip.tokenizers.registry"):
        loaded = toklip.build_tokenizer("ibq_tiny", checkpoint=tmp_path / "ibq.ckpt")
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in ema.items())  # the EMA weights, not the raw
    assert "loss.discriminator.main.0.weight" in caplog.text and "model_ema.decay" in caplog.text
    source.load_state_dict(ema)
    assert torch.equal(loaded.encode(images).indices, source.encode(images).indices)


def test_ibq_indices_are_the_largest_dot_product_and_codes_the_codebook_rows(images):
    tokenizer = toklip.build_tokenizer("ibq_tiny")
    encoding = tokenizer.encode(images)
    z = tokenizer.latents(images).permute(0, 2, 3, 1).reshape(-1, tokenizer.code_dim)
    expected = (z @ tokenizer.codebook().t()).argmax(dim=1).view(encoding.indices.shape)
    assert torch.equal(encoding.indices, expected)  # not the nearest code in L2: IBQ's codes have free norms
    assert torch.equal(encoding.codes, tokenizer.lookup(encoding.indices))  # bit for bit, as the reference's quant


@pytest.mark.parametrize("max_scores", [1, 37, 4096, 2**30])
def test_ibq_search_in_pieces_equals_the_search_in_one_piece(max_scores):
    # More vectors than one piece's 256 rows, so every budget splits the rows, the codes or both.
    generator = torch.Generator().manual_seed(0)
    vectors, codebook = torch.randn(260, 32, generator=generator), torch.randn(300, 32, generator=generator)
    one_piece = (vectors @ codebook.t()).argmax(dim=1)
    assert torch.equal(best_dot_product_codes(vectors, codebook, max_scores), one_piece)


def test_ibq_ties_go_to_the_lower_index():
    codebook = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    codebook[700] = codebook[3] = torch.full((8,), 5.0)  # equal scores, in different pieces of the search
    codebook[512] = codebook[900] = torch.full((8,), -5.0)
    vectors = torch.stack([torch.ones(8), -torch.ones(8)])
    assert best_dot_product_codes(vectors, codebook, max_scores=100).tolist() == [3, 512]


def test_ibq_search_memory_is_bounded_by_its_budget(monkeypatch):
    # The search never holds more than `max_search_scores` scores at once, whatever the batch.
    sizes = []
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: sizes.append(a.shape[0] * b.shape[1]) or real_matmul(a, b))
    tokenizer = toklip.build_tokenizer("ibq_tiny")
    tokenizer.max_search_scores = 2048
    tokenizer.encode(torch.rand(4, 3, 64, 64) * 2 - 1)
    assert sizes and max(sizes) <= 2048
