"""Write a source as webdataset shards: ``python tools/make_shards.py SOURCE OUT_DIR``.

A thin wrapper: the arguments, examples and ``main`` live in :mod:`mimkit.cli.make_shards`, which
``mimkit make-shards ...`` runs where mimkit is installed; this file runs it from a checkout without
installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mimkit.cli.make_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
