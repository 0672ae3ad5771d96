"""Named transformer specs for the token encoder (and the matching timm ViTs for small teachers).

The timm models are registered in timm's global registry with a `toklip_` prefix, so that they
cannot be mistaken for (or collide with) timm's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class BackboneSpec:
    """A SigLIP-style ViT trunk: pre-norm blocks, tanh-GELU, LayerNorm eps 1e-6, MAP pooling."""

    width: int
    depth: int
    heads: int
    mlp_ratio: float

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


BACKBONES: dict[str, BackboneSpec] = {
    "so400m": BackboneSpec(width=1152, depth=27, heads=16, mlp_ratio=3.7362),  # MLP 4304
    "vit_l16": BackboneSpec(width=1024, depth=24, heads=16, mlp_ratio=4.0),
    "vit_b16": BackboneSpec(width=768, depth=12, heads=12, mlp_ratio=4.0),
    "tiny": BackboneSpec(width=128, depth=4, heads=4, mlp_ratio=4.0),
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}") from None


def _tiny_vit(name: str, img_size: int, patch_size: int, pretrained: bool, kwargs: dict) -> VisionTransformer:
    """The `tiny` backbone as a patch-embedding ViT: the vision tower of small open_clip teachers.

    Its `visual.trunk.*` keys are those of a `tiny` token encoder, so a student copies its blocks.
    """
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; train one (see the miniature)")
    spec = BACKBONES["tiny"]
    args = dict(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=spec.width,
        depth=spec.depth,
        num_heads=spec.heads,
        mlp_ratio=spec.mlp_ratio,
        class_token=False,
        global_pool="map",
        act_layer="gelu_tanh",
    )
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return VisionTransformer(**{**args, **kwargs})


@register_model
def toklip_vit_tiny_patch8_siglip_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """8x8 patches at 64 px: the grid of `llamagen_tiny` (downsample 8)."""
    return _tiny_vit("toklip_vit_tiny_patch8_siglip_64", 64, 8, pretrained, kwargs)


@register_model
def toklip_vit_tiny_patch4_siglip_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """8x8 patches at 32 px: the grid of `llamagen_tiny_f4` (downsample 4); the CPU miniature's teacher."""
    return _tiny_vit("toklip_vit_tiny_patch4_siglip_32", 32, 4, pretrained, kwargs)
