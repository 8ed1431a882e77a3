"""Pretraining methods and their parts (masking, targets, decoders).

Importing this package registers every method with :func:`build_method`.
"""

import mimkit.ssl.colornoise  # noqa: F401  (registers the 'colornoise' mask type)
from mimkit.ssl import masking
from mimkit.ssl.mae import MAE
from mimkit.ssl.registry import build_method, list_methods, method_options, register_method

__all__ = ["MAE", "build_method", "list_methods", "masking", "method_options", "register_method"]
