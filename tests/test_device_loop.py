"""The device loop on a fake generator and a fake clock: order, release, stop, errors, and
the seconds it adds up (compilation excluded)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flax_captioner import device_loop
from flax_captioner.feed import Batch
from flax_captioner.sources import InputItem

# Fake seconds each step takes.
READ, DISPATCH, COMPILE, RESULT = 0.5, 1.0, 4.0, 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Launched:
    first_index: int
    events: list
    clock: Clock

    def result(self) -> str:
        self.events.append(("result", self.first_index))
        self.clock.now += RESULT
        return f"output {self.first_index}"


class FakeGenerator:
    """Dispatches at DISPATCH seconds, compiling (COMPILE more) the first time."""

    def __init__(self, clock: Clock, events: list, fail_at: int | None = None):
        self.clock, self.events, self.fail_at = clock, events, fail_at
        self.compile_seconds = 0.0

    def dispatch(self, pixel_values, settings, *, rng, first_index, params):
        if first_index == self.fail_at:
            raise RuntimeError(f"batch at {first_index} cannot run")
        self.events.append(("dispatch", first_index, params))
        if not self.compile_seconds:
            self.compile_seconds += COMPILE
            self.clock.now += COMPILE
        self.clock.now += DISPATCH
        return Launched(first_index, self.events, self.clock)


def batches(clock: Clock, events: list, sizes: list[int], fail_reading_at: int | None = None):
    """Batches of ``sizes`` decoded images (0: every item failed), two items each; reading
    one takes READ seconds."""
    for number, decoded in enumerate(sizes):
        if number == fail_reading_at:
            raise OSError(f"cannot read batch {number}")
        clock.now += READ
        items = [InputItem(2 * number + offset, f"img{2 * number + offset}")
                 for offset in range(2)]
        errors = [None] * decoded + ["unreadable"] * (2 - decoded)
        yield Batch(items, errors, np.zeros((decoded, 3, 2, 2), np.float32), decoded, 0.0,
                    lambda number=number: events.append(("release", 2 * number)))


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(device_loop.time, "perf_counter", clock)
    return clock


@dataclasses.dataclass
class Timings:
    device_seconds: float = 0.0
    input_wait_seconds: float = 0.0


def test_batches_run_one_ahead_and_are_released_before_they_are_yielded(clock):
    events: list = []
    timings = Timings()
    generator = FakeGenerator(clock, events)
    got = []
    for batch, output in device_loop.run(batches(clock, events, [2, 0, 2, 1]), generator,
                                         "settings", params="params", timings=timings):
        events.append(("yield", batch.items[0].index))
        got.append(output)
    assert got == ["output 0", None, "output 4", "output 6"]  # None: nothing decoded
    assert events == [
        ("dispatch", 0, "params"),
        ("result", 0), ("release", 0), ("yield", 0),  # batch 2 has nothing to dispatch
        ("dispatch", 4, "params"), ("release", 2), ("yield", 2),
        ("dispatch", 6, "params"), ("result", 4), ("release", 4), ("yield", 4),
        ("result", 6), ("release", 6), ("yield", 6)]
    # Three dispatches and results; compilation excluded; four reads and the end's.
    assert timings.device_seconds == pytest.approx(3 * (DISPATCH + RESULT))
    assert timings.input_wait_seconds == pytest.approx(4 * READ)


def test_stop_ends_the_loop_after_the_batches_on_the_devices(clock):
    events: list = []
    asked = []

    def stop() -> bool:
        asked.append(len(events))
        return len(asked) > 2  # stop before reading a third batch

    done = [batch.items[0].index for batch, _ in device_loop.run(
        batches(clock, events, [2, 2, 2, 2]), FakeGenerator(clock, events), "settings",
        stop=stop)]
    assert done == [0, 2]
    assert [event for event in events if event[0] == "dispatch"] == [
        ("dispatch", 0, None), ("dispatch", 2, None)]


@pytest.mark.parametrize("fail", ["reading", "dispatching"])
def test_a_failing_batch_is_raised_after_the_batch_before_it(clock, fail):
    events: list = []
    generator = FakeGenerator(clock, events, fail_at=4 if fail == "dispatching" else None)
    done = []
    with pytest.raises(OSError if fail == "reading" else RuntimeError):
        for batch, output in device_loop.run(
                batches(clock, events, [2, 2, 2], fail_reading_at=2 if fail == "reading" else None),
                generator, "settings"):
            done.append((batch.items[0].index, output))
    assert done == [(0, "output 0"), (2, "output 2")]


def test_one_ahead_keeps_the_item_in_flight_when_the_next_fails():
    def dispatch(item):
        if item == 2:
            raise ValueError("batch 2 cannot run")
        return f"launched {item}"

    def items(fail_reading_at):
        for item in range(4):
            if item == fail_reading_at:
                raise OSError(f"cannot read batch {item}")
            yield item

    for failing, error in ((4, ValueError), (2, OSError), (1, OSError)):
        got = []
        with pytest.raises(error):
            for pair in device_loop.one_ahead(items(failing), dispatch):
                got.append(pair)
        assert got == [(0, "launched 0"), (1, "launched 1")][:min(failing, 2)]
    assert list(device_loop.one_ahead([], dispatch)) == []
