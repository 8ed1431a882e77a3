"""Recipe schema and loading, the DeepSpeed trainer, checkpoints and run directories.

``import mimkit.train`` stays light: DeepSpeed is imported only when training starts.
"""

from mimkit.train.config import Recipe, RecipeError, load_recipe
from mimkit.train.schedule import warmup_cosine_lr
from mimkit.train.trainer import NonFiniteLossError, RunResult, load_method, pretrain

__all__ = [
    "NonFiniteLossError",
    "Recipe",
    "RecipeError",
    "RunResult",
    "load_method",
    "load_recipe",
    "pretrain",
    "warmup_cosine_lr",
]
