"""Pretraining methods and their parts (masking, targets, decoders).

Importing this package registers every method with :func:`build_method` and every mask type
with :func:`masking.build`.
"""

import mimkit.finetune.classifier  # noqa: F401  (registers 'finetune': fine-tuning on the same trainer)
import mimkit.ssl.colornoise  # noqa: F401  (registers the 'colornoise' mask type)
from mimkit.ssl import masking
from mimkit.ssl.cae import CAE
from mimkit.ssl.cmae import ContrastiveMAE
from mimkit.ssl.mae import MAE
from mimkit.ssl.mixedae import MixedAE
from mimkit.ssl.painter import Painter
from mimkit.ssl.registry import build_method, list_methods, method_options, register_method

__all__ = [
    "CAE",
    "ContrastiveMAE",
    "MAE",
    "MixedAE",
    "Painter",
    "build_method",
    "list_methods",
    "masking",
    "method_options",
    "register_method",
]
