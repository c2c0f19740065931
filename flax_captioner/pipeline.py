"""Batch captioning: inputs -> feed (decoding threads) -> generator -> rows on disk.

``run_pipeline`` streams any number of images with bounded memory, keeps the device busy
while decoding keeps up, resumes a killed run exactly where its output stops, and under
``jax.distributed`` splits the inputs over processes and merges their outputs at the end.
The command line's ``caption`` command is a thin call to ``run_pipeline``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from flax_captioner import device_loop, feed, multihost, ownership, sharding, storage
from flax_captioner.captioner import Captioner, decode_workers
from flax_captioner.errors import DataError, OptionError, OutputError, PipelineInterrupted
from flax_captioner.options import CaptionOptions, output_format
from flax_captioner.ownership import OutputLock
from flax_captioner.settings import GenerationSettings
from flax_captioner.sources import (PIPE_PREFIX, TABLE_EXTENSIONS, TAR_EXTENSIONS,
                                    CheckedInputs, InputItem, Inputs, check_inputs,
                                    iter_inputs)
from flax_captioner.writers import (Row, RowWriter, check_writable, exists, format_score,
                                    merge_shards, open_writer, part_path)

# Without a terminal, a progress bar appears only for runs at least this long (a log line).
_PROGRESS_DELAY_SECONDS = 30.0


@dataclasses.dataclass
class PipelineStats:
    """What a run did (this process's share under ``jax.distributed``).

    Attributes:
      captioned: images captioned in this run.
      errors: error rows written in this run (unreadable images, damaged tar shards).
      resumed: rows already in the output from earlier runs, skipped.
      wall_seconds: the run, from the first input read to the last row flushed.
      decode_seconds: image decoding + preprocessing, summed over the decoding threads (or
        the processes they hand images to).
      device_seconds: time the device loop spent on the model: dispatching batches (their
        pixels copied to the devices) and waiting for their outputs, compilation excluded.
        A batch also runs while the loop reads the next one and writes the rows of the one
        before; that overlap is not counted, so images / device_seconds is the devices' own
        rate only where they bound the run.
      input_wait_seconds: time the device loop waited for decoded batches (0 when decoding
        keeps up).
      decode_threads: number of decoding threads.
      decode_processes: whether each decoding thread handed its work to a process.
      load_seconds: loading the captioner's checkpoint (before the run; 0 when unknown).
      compile_seconds: compiling the generator's programs during the run.

    ``images_per_second`` is the captioning rate: images captioned (error rows, which cost no
    device time, excluded) per second of the run with compilation taken out, so a short run is
    not judged by its one-off compile, nor an unreadable batch by how fast it failed.
    """

    captioned: int = 0
    errors: int = 0
    resumed: int = 0
    wall_seconds: float = 0.0
    decode_seconds: float = 0.0
    device_seconds: float = 0.0
    input_wait_seconds: float = 0.0
    decode_threads: int = 1
    decode_processes: bool = False
    load_seconds: float = 0.0
    compile_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Images captioned per second of the run, compilation excluded (0 when none were)."""
        seconds = self.wall_seconds - self.compile_seconds
        return self.captioned / seconds if self.captioned and seconds > 0 else 0.0

    def summary(self) -> str:
        """One line: counts, throughput and where the time went."""
        done = self.captioned + self.errors
        resumed = f", {self.resumed} already done" if self.resumed else ""
        if not done:
            return f"nothing to caption: no new images{resumed}"
        rate = (f", {self.images_per_second:.2f} images/s excluding compilation"
                if self.captioned else "")
        workers = (_count(self.decode_threads, "process", "processes") if self.decode_processes
                   else _count(self.decode_threads, "thread"))
        return (f"captioned {_count(self.captioned, 'image')} "
                f"({_count(self.errors, 'error')}{resumed}) in "
                f"{self.wall_seconds:.1f} s{rate}; "
                f"load {self.load_seconds:.1f} s, compile {self.compile_seconds:.1f} s, "
                f"decoding {self.decode_seconds:.1f} s over {workers}, "
                f"device {self.device_seconds:.1f} s, "
                f"device waited for input {self.input_wait_seconds:.1f} s")


def _count(number: int, noun: str, plural: str | None = None) -> str:
    """``number`` and ``noun``, plural unless one: "1 image", "3 errors"."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def run_pipeline(inputs: Inputs, output: str | None, options: CaptionOptions | None = None,
                 captioner: Captioner | None = None) -> PipelineStats:
    """Captions every image ``inputs`` name into ``output``, one row per image in input order.

    Args:
      inputs: image files, directories, globs, .txt/.csv path lists, .tar shards, tables
        (see ``sources.iter_inputs``), or what ``preflight.check_run`` returned for them.
      output: a .jsonl, .parquet or .pq file (or, with ``options.output_format``, another
        name; .json is refused); None writes JSONL to stdout (no resume).
      options: every choice of the run (``CaptionOptions``; None: the defaults). Of note:
        ``batch_size`` images per batch are split over this process's local devices; every
        batch is full but the last, which is padded to ``batch_size`` once a full batch has
        compiled, so it reuses that program. ``resume`` continues after the rows ``output``
        already holds. Sampling folds each image's input index into
        ``seed``'s key, so a resumed run samples what an uninterrupted one would. With
        ``num_return_sequences`` > 1 each row also lists every returned sequence, ranked;
        ``token_logprobs`` adds each generated token's log-probability, EOS included.
      captioner: a loaded ``Captioner``; None loads ``options.model``
        (``Captioner.from_options``) once the inputs and output have been checked.

    Returns:
      PipelineStats: what this process did; ``summary()`` words it in one line.

    Raises:
      DataError: a glob matches nothing, a path list is unreadable, or the inputs name no
        image at all.
      OutputError: the output cannot be written or belongs to other inputs (before any work).
      PipelineInterrupted: SIGINT/SIGTERM; rows so far are flushed and a rerun resumes.
      ProcessGroupError: another process failed, or did not finish within
        ``options.process_timeout_seconds``; this process's rows are kept and a rerun resumes.
      OptionError: a bad option or generation setting (before any work).
      ValueError: an output whose suffix and ``output_format`` name no format, or two.
    """
    options = options or CaptionOptions()
    format_ = output_format(output, options.output_format)
    inputs = check_inputs(inputs, options.storage_options, image_column=options.image_column,
                          id_column=options.id_column)
    if output is not None:
        ownership.check_not_input(output, inputs)
    if captioner is None:
        if output is not None:  # fails fast before the load; checked again under the lock
            check_writable(output, options.storage_options)
            ownership.check_existing(output, format_, resume=options.resume,
                                     storage_options=options.storage_options)
        captioner = Captioner.from_options(options)
    settings = captioner.settings(**options.generation_overrides())  # checked before any work
    if settings.output_scores or settings.output_logits:
        raise OptionError("output_scores", "and output_logits are per-step arrays of "
                          "Captioner.generate; rows carry per-token log-probabilities instead "
                          "(token_logprobs)")
    process_index, process_count = jax.process_index(), jax.process_count()
    if process_count > 1 and output is None:
        raise ValueError("a multi-process run needs an output file (stdout cannot be merged)")
    if process_count > 1 and options.extend:
        raise OptionError("extend", "works in one process: each process's part holds every "
                          "n-th input, which new inputs would shift")
    target = output if process_count == 1 or output is None else part_path(
        output, process_index, process_count)
    storage_options = options.storage_options
    if (target != output and options.resume and exists(output, storage_options)
            and not exists(target, storage_options)):
        raise OutputError(f"{output}: already holds the merged output of a finished run",
                          fix=("other_output", "start_over"))
    items = sharding.process_slice(
        iter_inputs(inputs, storage_options, image_column=options.image_column,
                    id_column=options.id_column),
        process_index, process_count)
    timeout = options.process_timeout_seconds
    try:
        show_progress = process_index == 0 if options.progress is None else options.progress
        stats = _caption_slice(captioner, items, output, target, format_, options, settings,
                               show_progress=show_progress,
                               total=_progress_total(inputs, process_index, process_count)
                               if show_progress else None)
    except BaseException as error:
        if process_count > 1:  # the others stop at once instead of waiting for this one
            multihost.finish(output, error=error, timeout_s=timeout)
        raise
    if process_count == 1 and not stats.resumed + stats.captioned + stats.errors:
        raise DataError(f"{' '.join(inputs.names)}: no images to caption")
    if process_count > 1:
        # Once every process has closed its part, process 0 interleaves them into one file.
        multihost.finish(output, timeout_s=timeout)
        if process_index == 0:
            merge_shards(output, format_, storage_options)
    return stats


def _manifest(captioner: Captioner, output_format: str, options: CaptionOptions,
              settings: GenerationSettings) -> dict[str, Any]:
    """The output's manifest (``ownership``): the model and every choice that changes a row."""
    choices = {name: getattr(options, name) for name in (
        "dtype", "fast_decode", "exif_transpose", "image_column", "id_column",
        "token_logprobs")}
    choices.update(dataclasses.asdict(settings))
    if settings.do_sample:  # the seed changes sampled captions only
        choices["seed"] = options.seed
    return ownership.make_manifest(
        output_format, {"name": options.model, "fingerprint": captioner.fingerprint}, choices)


def _caption_slice(captioner: Captioner, items: Iterator[InputItem], output: str | None,
                   target: str | None, format_: str, options: CaptionOptions,
                   settings: GenerationSettings, *, show_progress: bool,
                   total: int | None = None) -> PipelineStats:
    """This process's share of a run: own ``target`` (its lock; its rows made as this run
    makes them), resume it, caption the rest of ``items`` into it, close it. Raises
    PipelineInterrupted after a signal, once the rows are flushed."""
    with contextlib.ExitStack() as owned:
        lock = OutputLock()  # stdout: nothing to own
        resume = options.resume and output is not None
        if target is not None:
            lock = owned.enter_context(ownership.lock_output(target, options.storage_options))
            manifest = _manifest(captioner, format_, options, settings)
            ownership.check_resumable(target, manifest, resume=resume,
                                      storage_options=options.storage_options)
        writer = open_writer(target, format_, resume=resume,
                             flush_seconds=options.flush_seconds,
                             storage_options=options.storage_options)
        if target is not None:
            ownership.write_manifest(target, manifest, options.storage_options)
        return _caption_owned(captioner, _skip_done(items, writer, target, options.extend),
                              writer, lock, output, target, options, settings,
                              show_progress=show_progress, total=total)


def _caption_owned(captioner: Captioner, items: Iterator[InputItem], writer: RowWriter,
                   lock: OutputLock, output: str | None, target: str | None,
                   options: CaptionOptions, settings: GenerationSettings, *,
                   show_progress: bool, total: int | None = None) -> PipelineStats:
    """Captions ``items`` into the open ``writer`` and closes it."""
    threads, processes = decode_workers(options)
    stats = PipelineStats(resumed=writer.rows_done, decode_threads=threads,
                          decode_processes=processes, load_seconds=captioner.load_seconds)
    stop = _StopRequest()
    started, compiled_before = time.perf_counter(), captioner.generator.compile_seconds
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_stop_on_signals(stop))
            bar = stack.enter_context(_progress_bar(show_progress, options.progress,
                                                    total=total, initial=stats.resumed))
            # A resumed run pads as the run it resumes did: the same programs (feed.batches).
            batches = stack.enter_context(captioner.batches(items, options,
                                                            pad_first=stats.resumed > 0))
            _caption_batches(captioner, batches, writer, stats, bar, stop, lock,
                             output=output, seed=options.seed, settings=settings,
                             row_format=_RowFormat(settings.num_return_sequences,
                                                   settings.eos_token_id,
                                                   options.token_logprobs))
    except BaseException:
        writer.flush()  # every finished row stays; the output resumes from there
        raise
    writer.close()
    stats.wall_seconds = time.perf_counter() - started
    stats.compile_seconds = captioner.generator.compile_seconds - compiled_before
    if stop.signal_number is not None:
        where = "" if output is None else "; run again with the same output to resume"
        raise PipelineInterrupted(
            f"interrupted: {stats.captioned + stats.errors} rows written this run"
            f" ({stats.resumed + stats.captioned + stats.errors} in "
            f"{target or 'stdout'}){where}", stats, stop.signal_number)
    return stats


def _skip_done(items: Iterator[InputItem], writer: RowWriter, target: str | None,
               extend: bool) -> Iterator[InputItem]:
    """The ``items`` the output ``writer`` opened still lacks.

    Resuming, its rows must be the first of ``items``, name for name (else it was made from
    other inputs: a file removed, added or renamed); they are skipped. Extending, the items
    whose names no row has are kept, in their order.

    Raises:
      OutputError: a row that is not the input at its place, naming both.
    """
    if not writer.rows_done:
        return items
    if extend:
        done = set(writer.images())
        return (item for item in items if item.name not in done)
    for row, image in enumerate(writer.images(), start=1):
        item = next(items, None)
        if item is None or item.name != image:
            given = "nothing" if item is None else repr(item.name)
            raise OutputError(
                f"{target}: row {row} of its {writer.rows_done} is {image!r} where these "
                f"inputs give {given}: it was made from other inputs",
                fix=("extend", "start_over", "other_output"))
    return items


def _caption_batches(captioner: Captioner, batches: Iterator[feed.Batch], writer: RowWriter,
                     stats: PipelineStats, bar: tqdm, stop: _StopRequest, lock: OutputLock, *,
                     output: str | None, seed: int, settings: GenerationSettings,
                     row_format: _RowFormat) -> None:
    """Writes the rows of every batch through the device loop (``device_loop.run``: the
    devices run the next batch meanwhile) until the inputs or a signal end, or, in a
    multi-process run, another process fails (two reads per batch; docs/scaling.md, "When a
    process fails")."""

    def stopped() -> bool:
        if stop.signal_number is not None:
            return True
        lock.check()  # another run took the output over (its lease ran out)
        multihost.raise_if_failed(output)
        return False

    if not captioner.generator.compile_seconds:  # the first batch compiles the search first
        # Drawn now only where the bar shows from the start (a terminal), not before its delay.
        bar.set_description_str("compiling", refresh=not bar.disable and not bar.delay)
    for batch, generated in device_loop.run(batches, captioner.generator, settings,
                                            rng=jax.random.key(seed), stop=stopped,
                                            timings=stats):
        writer.write(_rows(batch, generated, captioner.decode, row_format))
        bar.set_description_str("", refresh=False)  # the search has compiled
        errors = sum(error is not None for error in batch.errors)
        stats.decode_seconds += batch.decode_seconds
        stats.captioned += batch.num_decoded
        stats.errors += errors
        bar.update(batch.num_decoded + errors)


@dataclasses.dataclass
class _StopRequest:
    """The first SIGINT or SIGTERM of a run: the device loop ends once the batches on the
    devices are written.

    Attributes:
      signal_number: the signal received; None while none has been.
    """

    signal_number: int | None = None


@dataclasses.dataclass(frozen=True)
class _RowFormat:
    """What a captioned row holds besides the best caption and its score.

    Attributes:
      num_sequences: sequences returned per image; above 1 the row lists them all, ranked.
      eos_token_id: ends a caption's tokens (for ``token_logprobs``).
      token_logprobs: add each generated token's log-probability, EOS included.
    """

    num_sequences: int
    eos_token_id: int
    token_logprobs: bool


def _rows(batch: feed.Batch, generated: Any, decode: Any, row_format: _RowFormat) -> list[Row]:
    """One row per item: its error, or its best caption (and every returned sequence)."""
    count = batch.num_decoded * row_format.num_sequences  # image-major; padding rows dropped
    sequences = [] if generated is None else [
        _sequence(caption, score, tokens, token_scores, row_format)
        for caption, score, tokens, token_scores in zip(
            decode(generated.sequences[:count]), generated.scores[:count],
            generated.sequences[:count], generated.token_scores[:count])]
    ranked = iter(range(0, len(sequences), row_format.num_sequences))
    rows: list[Row] = []
    for item, error in zip(batch.items, batch.errors):
        if error is not None:
            rows.append({"image": item.name, "error": error.reason})
            continue
        first = next(ranked)
        row: Row = {"image": item.name, **sequences[first]}
        if row_format.num_sequences > 1:
            row["sequences"] = [{"rank": rank, **sequence} for rank, sequence in enumerate(
                sequences[first:first + row_format.num_sequences], start=1)]
        rows.append(row)
    return rows


def _sequence(caption: str, score: float, tokens: np.ndarray, token_scores: np.ndarray,
              row_format: _RowFormat) -> Row:
    """``caption``, ``score`` and, when asked for, the log-probability of each generated token
    (``tokens`` int32[T] from decoder_start, ``token_scores`` float32[T]), EOS included."""
    sequence: Row = {"caption": caption, "score": format_score(score)}
    if row_format.token_logprobs:
        generated = tokens[1:]
        ends = np.flatnonzero(generated == row_format.eos_token_id)
        length = int(ends[0]) + 1 if len(ends) else len(generated)
        sequence["token_logprobs"] = [format_score(value)
                                      for value in token_scores[1:1 + length]]
    return sequence


@contextlib.contextmanager
def _stop_on_signals(stop: _StopRequest) -> Iterator[None]:
    """SIGINT/SIGTERM fill in ``stop`` (the loop ends once the batches on the device are
    written); a second one raises PipelineInterrupted at once.

    Where the handler replaced ends the process (an ``ends_process`` attribute: the command
    line's), a second signal calls it instead: an exception unwinding while XLA compiles or
    JAX's threads run crashed the interpreter's exit, and the output resumes from its last
    commit anyway. Signals are only handled in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in handled}

    def request_stop(signum: int, frame: Any) -> None:
        if stop.signal_number is not None:
            if getattr(previous[signum], "ends_process", False):
                previous[signum](signum, frame)
            # Unwinds at once; the writer flushes finished rows.
            raise PipelineInterrupted(
                f"interrupted at once by a second {signal.Signals(signum).name}; run again "
                "with the same output to resume", None, signum)
        stop.signal_number = signum
        with contextlib.suppress(RuntimeError):  # the signal came mid-write to stderr
            print(f"\n{signal.Signals(signum).name}: finishing the batches on the device and "
                  "flushing the output (send it again to stop at once)", file=sys.stderr)

    for signum in handled:
        signal.signal(signum, request_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _progress_total(inputs: CheckedInputs, process_index: int, process_count: int) -> int | None:
    """This process's number of inputs where counting them is cheap: local image files,
    directories and path lists (walked or read once more); None for tar shards, tables, URLs
    and ``pipe:`` streams, whose count would cost reading them."""
    for spec, matches in zip(inputs.specs, inputs.matches):
        if storage.is_remote(spec) or spec.startswith(PIPE_PREFIX):
            return None
        for path in matches or (storage.local_path(spec),):
            if os.path.splitext(path)[1].lower() in TAR_EXTENSIONS | TABLE_EXTENSIONS:
                return None
    return len(range(process_index, sum(1 for _ in iter_inputs(inputs)), process_count))


@contextlib.contextmanager
def _progress_bar(show: bool, requested: bool | None, *, total: int | None = None,
                  initial: int = 0) -> Iterator[tqdm]:
    """The run's bar: ``total`` rows of this process when counted (a percentage and an ETA),
    ``initial`` of them already done (resumed)."""
    on_terminal = sys.stderr.isatty()
    delay = 0.0 if on_terminal or requested else _PROGRESS_DELAY_SECONDS
    with tqdm(unit="img", total=total, initial=initial, file=sys.stderr, disable=not show,
              delay=delay,
              mininterval=0.1 if on_terminal else _PROGRESS_DELAY_SECONDS,
              dynamic_ncols=True) as bar:
        yield bar
