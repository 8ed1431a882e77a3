"""An encoder next to a random init of its shape: ``python tools/compare_random.py ...``.

A thin wrapper: the arguments, examples and ``main`` live in :mod:`mimkit.cli.compare_random`, which
``mimkit compare-random ...`` runs where mimkit is installed; this file runs it from a checkout
without installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mimkit.cli.compare_random import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
