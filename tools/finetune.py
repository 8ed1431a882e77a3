"""Fine-tune an encoder into a classifier: ``python tools/finetune.py RECIPE [section.key=value ...]``.

The script torchrun and the deepspeed launcher take. A thin wrapper: the arguments, examples and
``main`` live in :mod:`mimkit.cli.finetune`, which ``mimkit finetune ...`` runs where mimkit is
installed; this file runs it from a checkout without installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mimkit.cli.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
