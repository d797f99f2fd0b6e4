"""TinyViT: a small vision transformer that embeds and "captions" an image.

The weights are **random** by default (``init_weights(seed)``), so the embedding is a real
ViT forward pass but carries no meaning, and the caption is a deterministic function of the
image, not a description of it.

Default size (``ViTConfig()``): 64x64x3 images, 8x8 patches (64 patches + a class token),
d_model 128, 2 layers, 4 heads, d_ff 512, caption heads over 16 adjectives, 24 nouns and
16 places → 437,120 parameters, 1,748,480 bytes of float32 weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .layers import Model, ParamSpec, encoder_block, layer_norm, to_host, transformer_block_specs

__all__ = ("ADJECTIVES", "NOUNS", "PLACES", "TinyViT", "ViTConfig")

ADJECTIVES = (
    "red", "blue", "green", "yellow", "dark", "bright", "small", "large",
    "old", "young", "quiet", "busy", "striped", "shiny", "soft", "wooden",
)  # fmt: skip
NOUNS = (
    "cat", "dog", "bird", "car", "tree", "house", "boat", "person",
    "flower", "horse", "bicycle", "mountain", "river", "chair", "cup", "book",
    "lamp", "train", "cloud", "fish", "apple", "clock", "bridge", "robot",
)  # fmt: skip
PLACES = (
    "on a beach", "in a field", "in the city", "at night", "in the snow", "by a lake",
    "in a kitchen", "on a table", "in a forest", "under the sky", "on the road",
    "in a garden", "near a window", "in the rain", "on a hill", "in a room",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "d_model", "n_layers",
                     "n_heads", "d_ff"):  # fmt: skip
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ViTConfig.{name} must be positive")
        if self.image_size % self.patch_size:
            raise ValueError("ViTConfig.image_size must be a multiple of patch_size")
        if self.d_model % self.n_heads:
            raise ValueError("ViTConfig.d_model must be a multiple of n_heads")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class TinyViT(Model):
    """Vision transformer encoder with random weights by default.

    ``TinyViT(config=None, *, xp=numpy, seed=0)``: non-overlapping patches → linear patch
    embedding, a class token, learned positions, pre-LayerNorm encoder blocks (shared with
    :class:`TinyLM` through ``layers.encoder_block``), final LayerNorm; the class token's
    output is the image embedding. Three linear heads pick an adjective, a noun and a place
    by argmax for :meth:`caption`.
    """

    config_cls = ViTConfig
    config: ViTConfig

    def param_specs(self) -> dict[str, ParamSpec]:
        c = self.config
        std = c.init_std
        out_std = std / math.sqrt(2 * c.n_layers)
        patch_dim = c.patch_size * c.patch_size * c.channels
        specs = {
            "patch.w": ParamSpec((patch_dim, c.d_model), 1.0 / math.sqrt(patch_dim)),
            "patch.b": ParamSpec((c.d_model,), "zeros"),
            "cls": ParamSpec((c.d_model,), std),
            "pos_emb": ParamSpec((c.n_patches + 1, c.d_model), std),
        }
        for prefix in self._iter_blocks(c.n_layers):
            specs.update(transformer_block_specs(prefix, c.d_model, c.d_ff, std, out_std))
        specs["ln_f.g"] = ParamSpec((c.d_model,), "ones")
        specs["ln_f.b"] = ParamSpec((c.d_model,), "zeros")
        head_std = 1.0 / math.sqrt(c.d_model)
        specs["head.adj"] = ParamSpec((c.d_model, len(ADJECTIVES)), head_std)
        specs["head.noun"] = ParamSpec((c.d_model, len(NOUNS)), head_std)
        specs["head.place"] = ParamSpec((c.d_model, len(PLACES)), head_std)
        return specs

    def patches(self, image: Any) -> Any:
        """``(n_patches, patch*patch*channels)`` rows of an ``(H, W, C)`` image."""
        c, xp = self.config, self.xp
        img = xp.asarray(image, dtype=xp.float32)
        want = (c.image_size, c.image_size, c.channels)
        if tuple(img.shape) != want:
            raise ValueError(f"image shape {tuple(img.shape)}, expected {want}")
        g, ps = c.image_size // c.patch_size, c.patch_size
        x = img.reshape(g, ps, g, ps, c.channels).transpose(0, 2, 1, 3, 4)
        return x.reshape(g * g, ps * ps * c.channels)

    def embed(self, image: Any) -> Any:
        """The image embedding, ``(d_model,)`` float32 (class token after the encoder)."""
        xp, c, p = self.xp, self.config, self.params
        x = self.patches(image) @ p["patch.w"] + p["patch.b"]
        x = xp.concatenate([p["cls"][None, :], x], axis=0) + p["pos_emb"]
        for prefix in self._iter_blocks(c.n_layers):
            x = encoder_block(xp, p, prefix, x, c.n_heads)
        x = layer_norm(xp, x, p["ln_f.g"], p["ln_f.b"])
        return x[0]

    def caption_ids(self, image: Any) -> tuple[int, int, int]:
        """Indices into ``ADJECTIVES``, ``NOUNS`` and ``PLACES`` (argmax of each head)."""
        xp, p = self.xp, self.params
        e = self.embed(image)
        picks = [int(to_host(xp.argmax(e @ p[f"head.{h}"]))) for h in ("adj", "noun", "place")]
        return picks[0], picks[1], picks[2]

    def caption(self, image: Any) -> str:
        """A few words chosen deterministically from the embedding, e.g. ``"a red cat on a
        beach"``."""
        a, n, pl = self.caption_ids(image)
        return f"a {ADJECTIVES[a]} {NOUNS[n]} {PLACES[pl]}"

    def random_image(self, seed: int = 0) -> Any:
        """A uniform-noise test image in ``[0, 1)``, ``(H, W, C)`` float32, on ``xp``."""
        c = self.config
        host = np.random.default_rng(seed).random(
            (c.image_size, c.image_size, c.channels), dtype=np.float32
        )
        return self.xp.array(host, dtype=self.xp.float32)
