"""ViT backbone registry on timm's VisionTransformer."""

from mimkit.models.backbone import (
    Backbone,
    create_backbone,
    list_backbones,
    load_backbone,
    register_backbone,
    save_backbone,
)
from mimkit.models.pos_embed import sincos_2d

__all__ = [
    "Backbone",
    "create_backbone",
    "list_backbones",
    "load_backbone",
    "register_backbone",
    "save_backbone",
    "sincos_2d",
]
