"""The device loop: decoded batches -> dispatched one ahead -> results -> released.

Every captioning consumer runs its batches through ``run``: ``Captioner.caption``, the
pipeline, Ray Data's ``CaptionImages`` and the trainer's evaluation captions. The devices run
batch i + 1 while the consumer turns batch i's result into captions or rows, and batch
i + 1's pixels travel to the devices during batch i's search.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import jax

from flax_captioner.feed import Batch
from flax_captioner.generator import Dispatched, GenerationOutput, Generator
from flax_captioner.settings import GenerationSettings

Item = TypeVar("Item")
Launched = TypeVar("Launched")


class Timings(Protocol):
    """Where ``run`` adds up its time (``pipeline.PipelineStats`` is one).

    Attributes:
      device_seconds: dispatching batches (their pixels copied to the devices) and waiting
        for their results, compilation excluded.
      input_wait_seconds: waiting for the feed's next batch.
    """

    device_seconds: float
    input_wait_seconds: float


def run(batches: Iterable[Batch], generator: Generator, settings: GenerationSettings, *,
        rng: jax.Array | None = None, params: Any = None,
        stop: Callable[[], bool] | None = None,
        timings: Timings | None = None) -> Iterator[tuple[Batch, GenerationOutput | None]]:
    """``(batch, its GenerationOutput)`` for each batch, in order; the output is None for a
    batch without a decoded image. Each batch is released (its pixels' memory handed back to
    the feed) before it is yielded.

    Args:
      batches: the feed's batches (``feed.batches``).
      generator: runs each batch's search (``Generator.dispatch``).
      settings: the search's validated settings.
      rng: the sampling key (``Generator.dispatch``: a batch's images fold in their first
        item's input index plus their row, so batching does not change a sample).
      params: parameters instead of the generator's own (``Generator.dispatch``).
      stop: asked before each batch is read; True ends the loop once the batches on the
        devices are yielded. It may raise instead (another process failed).
      timings: where the device and input-wait seconds are added.

    Raises:
      What reading or dispatching a batch raises, once the batch before it is yielded, so
      the work already on the devices is kept (``one_ahead``).
    """
    batches = iter(batches)

    def inputs() -> Iterator[Batch]:
        while stop is None or not stop():
            started = time.perf_counter()
            batch = next(batches, None)
            if timings is not None:
                timings.input_wait_seconds += time.perf_counter() - started
            if batch is None:
                return
            yield batch

    def dispatch(batch: Batch) -> Dispatched | None:
        if not batch.num_decoded:
            return None
        started, compiled = time.perf_counter(), generator.compile_seconds
        dispatched = generator.dispatch(batch.pixel_values, settings, rng=rng,
                                        first_index=batch.items[0].index, params=params)
        if timings is not None:
            timings.device_seconds += (time.perf_counter() - started
                                       - (generator.compile_seconds - compiled))
        return dispatched

    for batch, dispatched in one_ahead(inputs(), dispatch):
        output = None
        if dispatched is not None:
            started = time.perf_counter()
            output = dispatched.result()
            if timings is not None:
                timings.device_seconds += time.perf_counter() - started
        batch.release()  # its search is done: the feed refills the pixels' memory
        yield batch, output


def one_ahead(items: Iterable[Item],
              dispatch: Callable[[Item], Launched]) -> Iterator[tuple[Item, Launched]]:
    """``(item, dispatch(item))`` for each item, in order, each yielded once the next item is
    dispatched too: with ``dispatch`` = ``Generator.dispatch``, the devices run batch i + 1
    while the caller waits for batch i's result and writes its rows.

    An error reading or dispatching item i + 1 is raised after item i is yielded, so the work
    already on the devices is kept.
    """
    previous: tuple[Item, Launched] | None = None
    try:
        for item in items:
            launched = dispatch(item)
            if previous is not None:
                yield previous
            previous = item, launched
    except Exception:
        if previous is not None:
            yield previous
        raise
    if previous is not None:
        yield previous
