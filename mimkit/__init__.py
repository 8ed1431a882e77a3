"""mimkit: self-supervised masked-image-modelling pretraining of Vision Transformers."""

from mimkit.interop.export import export_timm
from mimkit.models import create_backbone, list_backbones, load_backbone, save_backbone

__version__ = "0.1.0"
__all__ = [
    "create_backbone",
    "export_timm",
    "list_backbones",
    "load_backbone",
    "save_backbone",
    "__version__",
]
