"""A shuffle buffer whose state after any number of draws can be rebuilt, for exact resumes.

webdataset's ``shuffle`` stage keeps its buffer in memory only: a stream restarted at a position
must refill it from there, missing what the old buffer still held and repeating what it had
already given out. This buffer draws the same way on every run (one seeded generator per stream),
so its state after ``n`` draws is a function of ``n`` alone and :func:`buffer_state` recomputes
it on sample numbers, without any data: which stream positions the buffer holds, in which slots,
and the generator as it then is. A resumed stream reads those samples again (numbered, so they can
be picked out before anything decodes them) and :func:`shuffled` continues exactly where the
uninterrupted stream would be.

The draws: the first ``size`` samples fill the buffer; each later sample replaces one drawn
uniformly from it (the drawn one is yielded); when the input ends, the rest leave in random order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class BufferState:
    """A buffer after some draws: the stream positions in its slots, the next position it reads,
    and its generator."""

    slots: list[int]
    next_position: int
    rng: random.Random

    @property
    def oldest(self) -> int:
        """The first stream position a resumed stream must read: the oldest held sample."""
        return min(self.slots, default=self.next_position)

    def wants(self, position: int) -> bool:
        """Whether the sample at ``position`` is still to come out of the buffer."""
        return position >= self.next_position or position in self._held

    def __post_init__(self):
        self._held = set(self.slots)


def buffer_state(draws: int, size: int, seed: int, length: int | None = None) -> BufferState:
    """The state of a ``size``-sample buffer seeded with ``seed`` after ``draws`` draws, over a
    stream of ``length`` samples (None: endless). Costs one generator call per draw."""
    if size < 1:
        raise ValueError(f"a shuffle buffer holds at least one sample, got size {size}")
    rng = random.Random(seed)
    end = float("inf") if length is None else length
    fill = int(min(size, end))
    slots, next_position, done = list(range(fill)), fill, 0
    while done < draws and next_position < end:
        slots[rng.randrange(size)] = next_position
        next_position += 1
        done += 1
    while done < draws and slots:
        k = rng.randrange(len(slots))
        slots[k], slots[-1] = slots[-1], slots[k]
        slots.pop()
        done += 1
    return BufferState(slots, next_position, rng)


def shuffled(
    samples: Iterable[dict[str, Any]], size: int, state: BufferState, position: Callable[[dict], int]
) -> Iterator[dict[str, Any]]:
    """``samples`` (in stream order, from ``state.oldest`` on, those ``state`` wants) through the
    buffer from ``state``. ``position`` reads a sample's stream position.

    A held sample that never comes (the data changed since) leaves its slot out: the stream goes
    on from a smaller buffer rather than stopping.
    """
    stream = iter(samples)
    buffer: list[dict[str, Any]] = []
    if state.slots:
        slot_of = {p: k for k, p in enumerate(state.slots)}
        restored: list[dict | None] = [None] * len(state.slots)
        pending = None
        for sample in stream:
            k = slot_of.get(position(sample))
            if k is None:  # past the held samples: the first new one
                pending = sample
                break
            restored[k] = sample
        buffer = [s for s in restored if s is not None]
        if pending is not None:
            stream = _prepend(pending, stream)
    rng = state.rng
    for sample in stream:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        k = rng.randrange(size)
        yield buffer[k]
        buffer[k] = sample
    while buffer:
        k = rng.randrange(len(buffer))
        buffer[k], buffer[-1] = buffer[-1], buffer[k]
        yield buffer.pop()


def _prepend(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest
