"""One entry point for every conversion: read a checkpoint safely, convert, write an export.

``convert_checkpoint(IN, OUT, source)`` is what ``tools/convert.py`` runs. Outputs:

- ``to="mimkit"``: ``encoder.safetensors`` + ``encoder.json`` (read by ``load_backbone``); with
  ``keep_decoder`` also ``model.safetensors`` + ``recipe.yaml`` (a ``method`` section), which
  ``mimkit.train.load_method`` rebuilds, so the model can be resumed or visualised;
- ``to="timm"``: ``timm.safetensors`` + ``timm.json`` (see :mod:`mimkit.interop.export`).

Every run also writes ``convert.json``: what was read, what was written, keys dropped, notes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from mimkit.files import atomic_write, atomic_write_text
from mimkit.interop.cae import cae_to_mimkit
from mimkit.interop.export import save_timm_export
from mimkit.interop.loading import read_state_dict
from mimkit.interop.mae import mae_to_mimkit
from mimkit.interop.timm import Converted, encoder_from_state, timm_to_mimkit
from mimkit.models import load_backbone, save_backbone

SOURCES = ("mae", "cae", "timm", "mimkit")
TARGETS = ("mimkit", "timm")
REPORT = "convert.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_RECIPE = "recipe.yaml"


def load_source(
    path: str | os.PathLike,
    source: str,
    *,
    keep_decoder: bool = False,
    num_heads: int | None = None,
    decoder_heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    norm_pix_loss: bool = True,
    swap_pos_layout: bool = True,
) -> Converted:
    """Read ``path`` as a ``source`` checkpoint and convert it (nothing is written)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid: {', '.join(SOURCES)}")
    if keep_decoder and source not in ("mae", "cae"):
        raise ValueError(f"keep_decoder applies to mae and cae checkpoints, not {source!r}")
    path = Path(path)
    if source == "mimkit":
        encoder = load_backbone(path)
        if img_size is not None:
            state = {k: v for k, v in encoder.state_dict().items()}
            encoder = encoder_from_state(state, num_heads=encoder.config["num_heads"], img_size=img_size)
        return Converted(encoder=encoder)
    state = read_state_dict(path)
    if source == "timm":
        return timm_to_mimkit(state, num_heads=num_heads, img_size=img_size)
    heads = {} if decoder_heads is None else {"decoder_heads": decoder_heads}
    if source == "mae":
        return mae_to_mimkit(
            state,
            keep_decoder=keep_decoder,
            num_heads=num_heads,
            norm_pix_loss=norm_pix_loss,
            img_size=img_size,
            **heads,
        )
    return cae_to_mimkit(
        state,
        keep_decoder=keep_decoder,
        num_heads=num_heads,
        img_size=img_size,
        swap_pos_layout=swap_pos_layout,
        **heads,
    )


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    source: str,
    *,
    to: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Convert ``src`` (a ``source`` checkpoint) into the directory ``out``; returns the report.

    Args:
        to: ``"mimkit"`` or ``"timm"``; default ``"timm"`` for a mimkit source, else ``"mimkit"``.
        **options: see :func:`load_source`.
    """
    to = to or ("timm" if source == "mimkit" else "mimkit")
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; valid: {', '.join(TARGETS)}")
    if to == "timm" and options.get("keep_decoder"):
        raise ValueError("a timm export holds the encoder only; drop keep_decoder or convert to mimkit")
    result = load_source(src, source, **options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if to == "timm":
        written.append(save_timm_export(result.encoder, out))
        written.append(out / json.loads(written[0].read_text())["weights"])
    else:
        extra = {"converted_from": source, "source_file": str(src), **result.extra}
        written.append(save_backbone(result.encoder, out, extra=extra))
        written.append(written[-1].with_suffix(".json"))
        if result.model is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
            atomic_write(out / MODEL_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
            recipe = {"method": {**result.method_cfg}}
            text = f"# converted from {source} checkpoint {src}\n" + yaml.safe_dump(recipe, sort_keys=False)
            atomic_write_text(out / MODEL_RECIPE, text)
            written += [out / MODEL_WEIGHTS, out / MODEL_RECIPE]
    report = {
        "source": source,
        "input": str(src),
        "to": to,
        "output": str(out),
        "files": [str(p) for p in written],
        "encoder": result.encoder.config,
        "full_model": result.method_cfg,
        "dropped_keys": result.dropped,
        "notes": result.notes,
        **result.extra,
    }
    atomic_write_text(out / REPORT, json.dumps(report, indent=2))
    return report
