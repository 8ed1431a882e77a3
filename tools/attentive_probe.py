"""Attentive probe of a frozen encoder (V-JEPA's protocol): ``python tools/attentive_probe.py ...``.

A thin wrapper: the arguments, examples and ``main`` live in :mod:`mimkit.cli.attentive_probe`,
which ``mimkit attentive-probe ...`` runs where mimkit is installed; this file runs it from a
checkout without installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mimkit.cli.attentive_probe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
