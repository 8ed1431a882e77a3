"""Writing files that matter (checkpoints, exports, results, shards) so a killed process never
leaves a half-written file under the final name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], sync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it to ``path``.

    The temporary name keeps ``path``'s suffix (``.name.tmpPID.png``), since writers such as
    matplotlib and ``numpy.savez`` choose the format from it; it is removed if ``write`` fails.
    ``sync`` flushes the file to disk before the rename (for pointers that other ranks read).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, sync: bool = False) -> Path:
    """:func:`atomic_write` of a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text), sync=sync)
