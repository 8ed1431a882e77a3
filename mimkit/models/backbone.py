"""The ViT backbone registry: timm's ``VisionTransformer`` plus a visible-token forward.

Every registered backbone is a :class:`Backbone`, a subclass of timm's public
``VisionTransformer`` with no head, so its state-dict keys are exactly timm's and an
exported encoder loads into ``timm.create_model(<timm name>, num_classes=0)`` unchanged.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from mimkit.files import atomic_write, atomic_write_text
from mimkit.models.pos_embed import sincos_2d
from mimkit.registry import Registry

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CONFIG = "encoder.json"
POS_EMBED_TYPES = ("sincos", "learn")


class _Preset:
    """The default of every backbone override: the registered preset's value."""

    def __repr__(self) -> str:
        return "<preset>"


PRESET: Any = _Preset()


class Backbone(VisionTransformer):
    """A headless timm ViT that can also run on the visible patches only.

    Args:
        name: registry name, recorded in the export.
        timm_name: the timm model of the same architecture (for export and interop).
        pos_embed: ``"sincos"`` (MAE's fixed 2D table, frozen) or ``"learn"`` (trainable,
            timm's truncated-normal init).
        **vit_kwargs: forwarded to ``VisionTransformer``.
    """

    def __init__(self, name: str, timm_name: str, pos_embed: str = "sincos", **vit_kwargs: Any):
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; valid: {', '.join(POS_EMBED_TYPES)}")
        vit_kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(num_classes=0, global_pool="token", pos_embed="learn", **vit_kwargs)
        self.name = name
        self.timm_name = timm_name
        self.pos_embed_type = pos_embed
        # The input normalisation the weights were trained with, {"mean": [...], "std": [...]} per
        # channel, written to and read from the export; None means ImageNet's for in_chans.
        self.normalization: dict[str, list[float]] | None = None
        if pos_embed == "sincos":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size)[None])
            self.pos_embed.requires_grad_(False)
        self.config = {
            "name": name,
            "timm_name": timm_name,
            "img_size": list(self.patch_embed.img_size),
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "pos_embed": pos_embed,
            "embed_dim": self.embed_dim,
            "depth": len(self.blocks),
            "num_heads": self.blocks[0].attn.num_heads,
            "mlp_ratio": self.blocks[0].mlp.fc1.out_features / self.embed_dim,
            "qkv_bias": self.blocks[0].attn.qkv.bias is not None,
            "init_values": vit_kwargs.get("init_values"),
            "drop_path_rate": float(vit_kwargs.get("drop_path_rate", 0.0)),
        }

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        return tuple(self.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def drop_path_rate(self) -> float:
        """Stochastic depth at the last block (the end of timm's linear ramp)."""
        return self.config["drop_path_rate"]

    # The steps of the forward pass, public so that methods compose them (MAE's visible-only
    # encoder, MixedAE's mixed sequences) instead of copying timm's internals.

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, D) patch embeddings with their positions added."""
        return self.patch_embed(images) + self.pos_embed[:, self.num_prefix_tokens :]

    def with_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, D) patch tokens -> (B, 1 + K, D): the cls token (with its zero position) prepended,
        then timm's position dropout and pre-norm, ready for :meth:`run_blocks`."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return self.ready_for_blocks(torch.cat([cls, tokens], dim=1))

    def ready_for_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D): timm's position dropout and pre-norm, nothing prepended; for
        sequences that hold no cls token (Painter's streams), else see :meth:`with_prefix`."""
        return self.norm_pre(self.pos_drop(tokens))

    def run_blocks(
        self,
        x: torch.Tensor,
        block_forward: Callable[[int, nn.Module, torch.Tensor], torch.Tensor | None] | None = None,
        taps: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the transformer blocks on (B, T, D) tokens; the final norm is not applied.

        Args:
            block_forward: ``(index, block, x) -> x``, replacing a block's forward (e.g. with a
                different attention); returning ``None`` runs the block as it is.
            taps: block indices whose outputs are returned too.

        Returns:
            ``(x, {index: output of that block})``. With ``set_grad_checkpointing()`` each block is
            recomputed in the backward pass.
        """
        tapped = {}
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for i, block in enumerate(self.blocks):

            def step(h: torch.Tensor, i: int = i, block: nn.Module = block) -> torch.Tensor:
                out = block_forward(i, block, h) if block_forward is not None else None
                return block(h) if out is None else out

            x = checkpoint(step, x, use_reentrant=False) if checkpointed else step(x)
            if i in taps:
                tapped[i] = x
        return x, tapped

    def forward_visible(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only the kept patches, MAE-style.

        Args:
            images: (B, C, H, W).
            ids_keep: (B, K) long indices of the kept patches (row-major patch order).

        Returns:
            (B, 1 + K, D): the final-normed cls token followed by the kept tokens, in the
            order of ``ids_keep``. The position embedding is added before selection, so each
            token keeps its own position.
        """
        x = self.patch_tokens(images)
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        x, _ = self.run_blocks(self.with_prefix(x))
        return self.norm(x)


def backbone_options(
    img_size: int | list[int] = PRESET,
    patch_size: int = PRESET,
    in_chans: int = PRESET,
    pos_embed: Literal["sincos", "learn"] = PRESET,
    embed_dim: int = PRESET,
    depth: int = PRESET,
    num_heads: int = PRESET,
    mlp_ratio: float = PRESET,
    qkv_bias: bool = PRESET,
    init_values: float | None = PRESET,
    drop_path_rate: float = PRESET,
) -> None:
    """The overrides every registered backbone takes; a default of ``PRESET`` keeps the preset's value."""


# Keyword arguments a caller may override on top of a preset. Architecture dimensions are
# overridable so tests can build tiny models; the export records every one of them.
OVERRIDABLE = tuple(inspect.signature(backbone_options).parameters)

BACKBONES: Registry[Backbone] = Registry("backbone", key="name")


def register_backbone(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
    """Register a backbone factory ``fn(**overrides) -> Backbone`` under its function name."""
    return BACKBONES.register(options=backbone_options)(fn)


def list_backbones() -> list[str]:
    """Names of the registered backbones."""
    return BACKBONES.names()


def create_backbone(name: str, **overrides: Any) -> Backbone:
    """Build a registered backbone; ``overrides`` replace the preset's keyword defaults."""
    overrides = {k: v for k, v in overrides.items() if k != "timm_name"}
    if isinstance(overrides.get("img_size"), tuple):
        overrides["img_size"] = list(overrides["img_size"])
    typed = BACKBONES.validate({"name": name, **overrides})
    name = typed.pop("name")
    if isinstance(typed.get("img_size"), list):
        typed["img_size"] = tuple(typed["img_size"])
    return BACKBONES.get(name)(**typed)


def _build(name: str, timm_name: str, preset: dict[str, Any], overrides: dict[str, Any]) -> Backbone:
    kwargs = {"img_size": 224, "in_chans": 3, "mlp_ratio": 4.0, "qkv_bias": True, **preset, **overrides}
    return Backbone(name=name, timm_name=timm_name, **kwargs)


@register_backbone
def vit_tiny_patch16(**overrides: Any) -> Backbone:
    """ViT-Ti/16: 192 wide, 12 deep, 3 heads."""
    preset = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3}
    return _build("vit_tiny_patch16", "vit_tiny_patch16_224", preset, overrides)


@register_backbone
def vit_small_patch16(**overrides: Any) -> Backbone:
    """ViT-S/16: 384 wide, 12 deep, 6 heads."""
    preset = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6}
    return _build("vit_small_patch16", "vit_small_patch16_224", preset, overrides)


@register_backbone
def vit_base_patch16(**overrides: Any) -> Backbone:
    """ViT-B/16: 768 wide, 12 deep, 12 heads."""
    preset = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}
    return _build("vit_base_patch16", "vit_base_patch16_224", preset, overrides)


@register_backbone
def vit_large_patch16(**overrides: Any) -> Backbone:
    """ViT-L/16: 1024 wide, 24 deep, 16 heads."""
    preset = {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
    return _build("vit_large_patch16", "vit_large_patch16_224", preset, overrides)


@register_backbone
def vit_huge_patch14(**overrides: Any) -> Backbone:
    """ViT-H/14: 1280 wide, 32 deep, 16 heads."""
    preset = {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16}
    return _build("vit_huge_patch14", "vit_huge_patch14_224", preset, overrides)


def save_backbone(backbone: Backbone, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Export ``encoder.safetensors`` + ``encoder.json`` into ``directory``; returns the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    config = {"format": "mimkit-encoder-v1", **backbone.config, **(extra or {})}
    if backbone.normalization is not None:
        config["normalization"] = backbone.normalization
    weights = directory / ENCODER_WEIGHTS
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    atomic_write_text(directory / ENCODER_CONFIG, json.dumps(config, indent=2))
    return weights


def load_backbone(path: str | os.PathLike, map_location: str = "cpu") -> Backbone:
    """Rebuild an exported encoder from its directory, its ``.safetensors`` or its ``.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / ENCODER_WEIGHTS
    weights, config_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for needed in (weights, config_path):
        if not needed.is_file():
            raise FileNotFoundError(
                f"encoder file {needed} not found (an export holds both "
                f"{ENCODER_WEIGHTS} and {ENCODER_CONFIG})"
            )
    config = json.loads(config_path.read_text())
    arch = {k: config[k] for k in OVERRIDABLE if k in config and config[k] is not None}
    backbone = create_backbone(config["name"], **arch)
    backbone.load_state_dict(load_file(str(weights), device=map_location), strict=True)
    backbone.normalization = config.get("normalization")
    return backbone
