"""IBQ: Index Backpropagation Quantization (TencentARC SEED-Voken, `src/IBQ/`), the tokenizer of TokLIP-XL.

The autoencoder is taming's VQGAN with 4 residual blocks a level (attention at 16x16 for a 256 px
image), read from SEED-Voken's Lightning checkpoints through taming's key names. The quantizer differs
from VQ's: a token's index is the code of the largest dot product with the latent, the first such code
on a tie (the reference takes the first maximum of the softmax of those products, the same code), and
its vector is the codebook row itself. Released checkpoints carry an EMA copy of every weight
(`model_ema.<name without dots>`), which the reference evaluates with; it is what loads here.
"""

from __future__ import annotations

import logging

import torch

from ..checkpoints import CheckpointError, StateDict
from .conv_vq import ConvVQConfig, ConvVQFactory
from .registry import register_tokenizer
from .taming import TamingVQ, taming_config

log = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
_GENERATOR_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")

# The scores searched at once: (tokens x codes) float32. The full (1024 x 262,144) matrix of a 512 px image
# is 1 GiB; pieces of 4 Mi scores (16 MiB) on a CPU and 256 Mi (1 GiB) on a GPU bound the search's memory
# whatever the batch, at no measurable cost in speed (experiments/bench_tokenizer.py).
MAX_SCORES = {"cpu": 2**22, "cuda": 2**28}
_ROWS_PER_PIECE = 256


def best_dot_product_codes(vectors: torch.Tensor, codebook: torch.Tensor, max_scores: int) -> torch.Tensor:
    """For each row of `vectors` (N, C), the index of the codebook row (K, C) with the largest dot
    product, the lowest index on a tie; computed in pieces of at most `max_scores` scores.

    A score is the same product in any piece (each is one row times one code over C), so the pieces
    change only the size of the temporaries, never an index.
    """
    rows = max(1, min(vectors.shape[0], _ROWS_PER_PIECE, max_scores))
    codes = max(1, min(codebook.shape[0], max_scores // rows))
    found = []
    for piece in vectors.split(rows):
        best_score, best_index = None, None
        for start in range(0, codebook.shape[0], codes):
            score, index = (piece @ codebook[start : start + codes].t()).max(dim=1)  # the first maximum of the piece
            index += start
            if best_score is None:
                best_score, best_index = score, index
            else:
                better = score > best_score  # strictly: an equal score of a later piece has a higher index
                best_score, best_index = torch.where(better, score, best_score), torch.where(better, index, best_index)
        found.append(best_index)
    return torch.cat(found)


class IBQTokenizer(TamingVQ):
    """An IBQ tokenizer. `max_search_scores` bounds the search's memory (None: `MAX_SCORES` of the device)."""

    checkpoint_weights_keys = ("state_dict",)
    max_search_scores: int | None = None

    def search_codes(self, vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        budget = self.max_search_scores or MAX_SCORES.get(vectors.device.type, MAX_SCORES["cuda"])
        return best_dot_product_codes(vectors, codebook, budget)

    def encoded_codes(self, z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        return z_q  # the reference's quantised latent equals the codebook rows bit for bit

    def convert_state_dict(self, state_dict: StateDict) -> tuple[StateDict, list[str]]:
        weights, set_aside = _ema_weights(state_dict)
        converted, dropped = super().convert_state_dict(weights)
        return converted, dropped + set_aside


def _ema_weights(state_dict: StateDict) -> tuple[StateDict, list[str]]:
    """The generator's weights, from their EMA shadows when the checkpoint has them; and what was set aside."""
    shadows = {key[len(EMA_PREFIX) :]: tensor for key, tensor in state_dict.items() if key.startswith(EMA_PREFIX)}
    raw = {key: tensor for key, tensor in state_dict.items() if not key.startswith(EMA_PREFIX)}
    if not shadows:
        return raw, []
    generator = [key for key in raw if key.startswith(_GENERATOR_PREFIXES)]
    lacking = [key for key in generator if key.replace(".", "") not in shadows]
    if lacking:
        raise CheckpointError(
            f"the checkpoint has EMA weights ({EMA_PREFIX}*) but none for {len(lacking)} of the tokenizer's: "
            f"{', '.join(lacking[:10])}{' ...' if len(lacking) > 10 else ''}"
        )
    used = {key.replace(".", "") for key in generator}
    weights = {key: shadows[key.replace(".", "")] if key in generator else tensor for key, tensor in raw.items()}
    unused_shadows = [EMA_PREFIX + key for key in shadows if key not in used]
    return weights, [*unused_shadows, f"the {len(generator)} raw weights (their EMA copies loaded)"]


def ibq_config(
    codebook_size: int, code_dim: int = 256, channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4), z_channels: int = 256, **sizes: int
) -> ConvVQConfig:
    """SEED-Voken's `configs/IBQ/gpu/imagenet_ibqgan_<codes>.yaml`: 256-d codes, 4 blocks a level."""
    return taming_config(codebook_size, code_dim, channel_mult, z_channels, encoder_res_blocks=4, **sizes)


for _codes in (1024, 8192, 16384, 262144):
    register_tokenizer(ConvVQFactory(IBQTokenizer, ibq_config(_codes)), name=f"ibq_{_codes}")
# Small widths for tests: the same search and key layout at a fraction of the cost.
register_tokenizer(ConvVQFactory(IBQTokenizer, ibq_config(512, 32, (1, 1, 2, 2), 64, base_channels=32)), name="ibq_tiny")
