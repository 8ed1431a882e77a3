"""Frozen-encoder evaluation: feature extraction, linear probes (MAE, DINOv2 grid), the attentive probe
(V-JEPA), weighted k-NN, few-shot, in-context segmentation (dense retrieval) and classification.

Importing this package also registers the ``voc:`` and ``ade20k:`` segmentation sources
(:mod:`mimkit.eval.seg_data`).

Every protocol reads features after the encoder's final norm (:mod:`mimkit.eval.features`), runs
its forward passes as one :class:`ExtractSettings` says (``extract=``; :mod:`mimkit.eval.settings`)
and returns a result dict ``{"tool", "protocol", "encoder", "data", "settings", "results"}`` that
the tools print as a table and write as JSON (:mod:`mimkit.eval.common`). Whatever a protocol can
check without a forward pass (batch sizes against the data, shots against the classes, memory
against the free memory) it checks before the first one (:mod:`mimkit.eval.preflight`).
"""

from mimkit.eval.attentive_probe import (
    AttentiveHead,
    AttentiveProbe,
    attentive_probe,
    compare_attentive,
    format_attentive_probe,
    train_attentive_probe,
)
from mimkit.eval.common import add_eval_args, format_table, write_json
from mimkit.eval.compare import compare_encoders, format_comparison
from mimkit.eval.features import (
    describe_encoder,
    encode,
    encoder_digest,
    extract_features,
    load_encoder,
    source_features,
)
from mimkit.eval.heads import LinearHead
from mimkit.eval.incontext import (
    MemoryBank,
    build_memory,
    compare_incontext,
    evaluate_memory,
    format_segmentation,
    incontext_segmentation,
)
from mimkit.eval.incontext_cls import format_classification, incontext_classification, prototype_top1
from mimkit.eval.knn import (
    KNN_KS,
    KNN_TEMPERATURE,
    draw_per_class,
    few_shot_knn,
    format_knn,
    knn_eval,
    knn_top1,
    nearest_neighbours,
    weighted_vote,
)
from mimkit.eval.lars import LARS
from mimkit.eval.linear_probe import (
    DINOV2_LRS,
    PRESETS,
    GridProbe,
    MaeProbe,
    format_linear_probe,
    linear_probe,
    preset_settings,
    train_grid_probe,
    train_mae_probe,
)
from mimkit.eval.settings import PRECISIONS, ExtractSettings

__all__ = [
    "AttentiveHead",
    "AttentiveProbe",
    "DINOV2_LRS",
    "KNN_KS",
    "KNN_TEMPERATURE",
    "LARS",
    "PRECISIONS",
    "PRESETS",
    "ExtractSettings",
    "GridProbe",
    "LinearHead",
    "MemoryBank",
    "MaeProbe",
    "add_eval_args",
    "attentive_probe",
    "build_memory",
    "compare_incontext",
    "compare_attentive",
    "compare_encoders",
    "describe_encoder",
    "draw_per_class",
    "encode",
    "encoder_digest",
    "evaluate_memory",
    "extract_features",
    "few_shot_knn",
    "format_attentive_probe",
    "format_classification",
    "format_comparison",
    "format_knn",
    "format_linear_probe",
    "format_segmentation",
    "format_table",
    "incontext_classification",
    "incontext_segmentation",
    "knn_eval",
    "knn_top1",
    "linear_probe",
    "load_encoder",
    "nearest_neighbours",
    "preset_settings",
    "prototype_top1",
    "source_features",
    "train_attentive_probe",
    "train_grid_probe",
    "train_mae_probe",
    "weighted_vote",
    "write_json",
]
