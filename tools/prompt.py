"""Visual prompting by inpainting: ``python tools/prompt.py --run RUN --train SOURCE ...``.

A thin wrapper: the arguments, examples and ``main`` live in :mod:`mimkit.cli.prompt`, which
``mimkit prompt ...`` runs where mimkit is installed; this file runs it from a checkout without
installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mimkit.cli.prompt import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
