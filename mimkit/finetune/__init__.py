"""Fine-tuning a pretrained encoder into a classifier, on the same trainer as pretraining.

- :mod:`mimkit.finetune.classifier`: the registered method ``finetune`` (encoder, head, Mixup/CutMix,
  soft-target loss, top-1/top-5 evaluation), which a recipe's ``method`` section names;
- :mod:`mimkit.finetune.transforms`: MAE's fine-tuning augmentation (``data.transform: finetune``);
- :mod:`mimkit.finetune.export`: the fine-tuned classifier as timm loads it;
- :mod:`mimkit.finetune.run`: :func:`~mimkit.finetune.run.finetune`, what ``tools/finetune.py`` runs
  (checks the data, trains, writes ``finetune.json``), and the side-by-side run from random init.
"""

from mimkit.finetune.classifier import FineTune
from mimkit.finetune.export import load_classifier, save_classifier
from mimkit.finetune.transforms import FINETUNE_TRANSFORM, finetune_transform

__all__ = ["FINETUNE_TRANSFORM", "FineTune", "finetune_transform", "load_classifier", "save_classifier"]
