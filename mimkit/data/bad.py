"""Bad data is skipped and counted, never fatal by itself: the shared counter and warning.

Every source that can meet damaged input (an undecodable or truncated image, a partial tar member,
a missing shard) keeps a :class:`SampleCounts`: samples delivered and samples skipped, in shared
memory so that DataLoader worker processes add to the same numbers the training process reads.
The trainer logs both to metrics.jsonl and stops only when the skipped share passes
``data.max_bad_fraction``.
"""

from __future__ import annotations

import multiprocessing
import warnings


class BadSampleWarning(UserWarning):
    """A sample, a file, a shard or part of a shard was skipped."""


class SampleCounts:
    """Samples delivered (``good``) and skipped as bad (``bad``), shared with worker processes."""

    def __init__(self) -> None:
        self._counts = multiprocessing.Array("q", 2)

    @property
    def good(self) -> int:
        return int(self._counts[0])

    @property
    def bad(self) -> int:
        return int(self._counts[1])

    def delivered(self, count: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[0] += count

    def skipped(self, count: int, message: str) -> None:
        """Count ``count`` bad samples and warn with ``message`` (which names the file)."""
        with self._counts.get_lock():
            self._counts[1] += count
        warnings.warn(message, BadSampleWarning, stacklevel=3)
