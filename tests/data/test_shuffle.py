"""The rebuildable shuffle buffer: a stream restarted from a replayed state is the uninterrupted one."""

import pytest

from mimkit.data.shuffle import buffer_state, shuffled


def _stream(first: int, last: int, state=None) -> list[dict]:
    samples = [{"n": n} for n in range(first, last)]
    return samples if state is None else [s for s in samples if state.wants(s["n"])]


def _run(length: int, size: int, seed: int, draws: int = 0) -> list[int]:
    state = buffer_state(draws, size, seed, length)
    samples = _stream(state.oldest, length, state)
    return [s["n"] for s in shuffled(samples, size, state, position=lambda s: s["n"])]


@pytest.mark.parametrize(("length", "size"), [(50, 7), (5, 7), (7, 7), (60, 1)])
def test_every_sample_comes_out_once_in_a_seeded_order(length, size):
    order = _run(length, size, seed=3)
    assert sorted(order) == list(range(length))
    assert order == _run(length, size, seed=3)
    if size > 1 and length > 1:
        assert order != list(range(length)) and order != _run(length, size, seed=4)


@pytest.mark.parametrize(("length", "size"), [(50, 7), (5, 7), (40, 40)])
def test_a_stream_restarted_after_any_number_of_draws_continues_exactly(length, size):
    whole = _run(length, size, seed=11)
    for draws in range(length + 1):  # through the filling, the streaming and the draining at the end
        assert _run(length, size, seed=11, draws=draws) == whole[draws:], draws


def test_an_endless_stream_restarts_exactly_and_reads_back_only_to_its_oldest_held_sample():
    size, seed = 10, 5
    whole_state = buffer_state(0, size, seed)
    whole = shuffled(_stream(0, 10_000), size, whole_state, position=lambda s: s["n"])
    head = [next(whole)["n"] for _ in range(300)]
    state = buffer_state(200, size, seed)
    assert state.next_position == size + 200 and len(state.slots) == size
    assert state.oldest == min(n for n in range(state.next_position) if n not in head[:200])
    resumed = shuffled(_stream(state.oldest, 10_000, state), size, state, position=lambda s: s["n"])
    assert [next(resumed)["n"] for _ in range(100)] == head[200:]


def test_a_held_sample_that_never_comes_leaves_its_slot_out():
    state = buffer_state(20, 6, seed=0, length=40)
    lost = state.slots[0]
    samples = [s for s in _stream(state.oldest, 40, state) if s["n"] != lost]
    out = [s["n"] for s in shuffled(samples, 6, state, position=lambda s: s["n"])]
    assert lost not in out and sorted(out) == sorted(set(state.slots) - {lost} | set(range(26, 40)))


def test_an_empty_buffer_is_refused():
    with pytest.raises(ValueError, match="at least one sample, got size 0"):
        buffer_state(0, 0, seed=0)
