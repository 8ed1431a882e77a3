"""Registry interop: official MAE / CAE and timm checkpoints in, timm-loadable encoders out.

All reading goes through :func:`read_state_dict` (safetensors, or ``torch.load`` with
``weights_only=True``), so no checkpoint can run code on load.
"""

from mimkit.interop.cae import cae_to_mimkit
from mimkit.interop.convert import SOURCES, TARGETS, convert_checkpoint, load_source
from mimkit.interop.export import export_timm, load_timm_export, save_timm_export, timm_export_config
from mimkit.interop.loading import CheckpointError, read_state_dict
from mimkit.interop.mae import mae_to_mimkit
from mimkit.interop.timm import (
    Converted,
    encoder_from_state,
    infer_arch,
    resample_encoder_state,
    timm_to_mimkit,
)

__all__ = [
    "SOURCES",
    "TARGETS",
    "CheckpointError",
    "Converted",
    "cae_to_mimkit",
    "convert_checkpoint",
    "encoder_from_state",
    "export_timm",
    "infer_arch",
    "load_source",
    "load_timm_export",
    "mae_to_mimkit",
    "read_state_dict",
    "resample_encoder_state",
    "save_timm_export",
    "timm_export_config",
    "timm_to_mimkit",
]
