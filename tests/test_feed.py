"""The host input layer: order, errors riding along, padding, bounded read-ahead, and the
same image checks for files, stream members and in-memory images."""

from __future__ import annotations

import io
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from flax_captioner import feed
from flax_captioner.decode_processes import DecodeProcesses
from flax_captioner.errors import CaptionerError, DataError, ImageReadError
from flax_captioner.preprocess import ImageDecoding, PreprocessConfig, load_and_preprocess_one
from flax_captioner.sources import InputItem

CONFIG = PreprocessConfig(size=(4, 4))


def png_bytes(seed: int, size: tuple[int, int] = (6, 5)) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def collect(items, batch_size, **kwargs) -> list[feed.Batch]:
    with feed.batches(items, CONFIG, batch_size, num_threads=2, **kwargs) as batches:
        return list(batches)


def test_batches_keep_input_order_and_carry_errors_without_shrinking():
    items = [InputItem(index, f"img{index}", data=png_bytes(index)) for index in range(7)]
    items[2] = InputItem(2, "broken", data=b"not an image")
    batches = collect(items, 3)
    assert [[item.name for item in batch.items] for batch in batches] == [
        ["img0", "img1", "broken", "img3"], ["img4", "img5", "img6"]]
    first = batches[0]
    assert first.num_decoded == 3 and first.pixel_values.shape == (3, 3, 4, 4)
    assert first.errors[2].path == "broken" and "not an image" in first.errors[2].reason
    expected = np.stack([load_and_preprocess_one(png_bytes(seed), CONFIG) for seed in (0, 1, 3)])
    np.testing.assert_array_equal(first.pixel_values, expected)


def test_last_partial_batch_is_padded_only_after_a_full_batch():
    items = [InputItem(index, f"img{index}", data=png_bytes(index)) for index in range(5)]
    last = collect(items, 4)[-1]
    assert last.num_decoded == 1 and last.pixel_values.shape[0] == 4
    np.testing.assert_array_equal(last.pixel_values[1:], np.repeat(last.pixel_values[:1], 3, 0))
    # A run shorter than one batch compiles its own size: no padding, unless asked for (a
    # resumed run, which pads as the run it resumes did).
    (only,) = collect(items[:3], 4)
    assert only.num_decoded == 3 and only.pixel_values.shape[0] == 3
    (padded,) = collect(items[:3], 4, pad_first=True)
    assert padded.num_decoded == 3 and padded.pixel_values.shape[0] == 4
    np.testing.assert_array_equal(padded.pixel_values[:3], only.pixel_values)


def test_released_batches_lend_their_memory_to_later_ones_and_kept_ones_stay_intact():
    items = [InputItem(index, f"img{index}", data=png_bytes(index)) for index in range(8)]
    expected = np.stack([load_and_preprocess_one(png_bytes(seed), CONFIG) for seed in range(8)])
    kept, memory = [], set()
    with feed.batches(items, CONFIG, 2, num_threads=2, prefetch=1) as batches:
        for number, batch in enumerate(batches):
            np.testing.assert_array_equal(batch.pixel_values, expected[2 * number:][:2])
            memory.add(batch.pixel_values.ctypes.data)
            if number % 2:
                kept.append(batch)  # never released: no later batch may write into it
            else:
                batch.release()
                batch.release()  # a second release must not hand the memory out twice
    # prefetch=1: at most three arrays are out at once, so the released ones came back.
    assert len(memory) < 4
    for batch, first in zip(kept, (2, 6)):
        np.testing.assert_array_equal(batch.pixel_values, expected[first:first + 2])


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_every_decoded_image_lands_in_its_row_in_input_order(processes):
    items = [InputItem(index, f"img{index}", data=b"broken" if index % 5 == 4 else
                       png_bytes(index)) for index in range(23)]
    with feed.batches(items, CONFIG, 3, num_threads=2, decode_processes=processes) as batches:
        got = [(batch.items, batch.errors, batch.pixel_values[:batch.num_decoded].copy())
               for batch in batches]
    decoded = [item for items, errors, _ in got for item, error in zip(items, errors)
               if error is None]
    assert [item.index for item in decoded] == [i for i in range(23) if i % 5 != 4]
    expected = np.stack([load_and_preprocess_one(item.data, CONFIG) for item in decoded])
    np.testing.assert_array_equal(np.concatenate([pixels for *_, pixels in got]), expected)


def sixteen_bit_png(seed: int) -> bytes:
    """A 16-bit grey PNG (mode I;16) with values far above 255: converting it clips them."""
    buffer = io.BytesIO()
    values = np.random.RandomState(seed).randint(256, 65536, (5, 6)).astype(np.uint16)
    Image.fromarray(values).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_clipped_16_bit_images_are_warned_about_once_per_feed(processes, caplog):
    # Each process of the pool decodes some of the images: the warning still comes once,
    # from the feed (the run), and each feed warns again.
    items = [InputItem(index, f"deep{index}", data=sixteen_bit_png(index)) for index in range(6)]
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flax_captioner"):
            with feed.batches(items, CONFIG, 2, num_threads=2,
                              decode_processes=processes) as batches:
                assert sum(batch.num_decoded for batch in batches) == 6
        messages = [record.getMessage() for record in caplog.records]
        assert len(messages) == 1
        assert messages[0].split(":")[0] in {item.name for item in items}
        assert "clipped to 0..255" in messages[0]


def test_own_size_images_of_different_sizes_in_one_batch_are_a_one_line_error():
    items = [InputItem(0, "wide", data=png_bytes(0, (6, 5))),
             InputItem(1, "tall", data=png_bytes(1, (5, 6)))]
    with feed.batches(items, PreprocessConfig(do_resize=False), 2, num_threads=1) as batches:
        (wide,) = [next(batches)]
        assert [item.name for item in wide.items] == ["wide"] and wide.num_decoded == 1
        with pytest.raises(ValueError, match=r"^tall: pixels of shape \[3, 6, 5\], but the "
                           r"batch's are \[3, 5, 6\] \(do_resize is false"):
            next(batches)


def test_a_batch_of_only_failures_has_no_pixels():
    items = [InputItem(0, "a", data=png_bytes(0)), InputItem(1, "b", data=b""),
             InputItem(2, "c", data=b"x")]
    first, last = collect(items, 1)
    assert last.num_decoded == 0 and last.pixel_values.shape == (0, 3, 4, 4)
    assert [error.reason for error in last.errors] == [
        "empty image data (0 bytes)", "not an image PIL can identify"]


def test_stream_members_are_read_in_input_order_on_one_thread():
    reads = []

    def reader(index):
        def read_bytes():
            reads.append((index, threading.current_thread().name))
            return png_bytes(index)
        return read_bytes

    items = [InputItem(index, f"m{index}", read_bytes=reader(index)) for index in range(9)]
    batches = collect(items, 2)
    assert [index for index, _ in reads] == list(range(9))
    assert len({name for _, name in reads}) == 1
    assert sum(batch.num_decoded for batch in batches) == 9


def test_decompression_bomb_limit_applies_to_every_source(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # the 6x5 test images exceed it
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(0))
    items = [InputItem(0, str(path)), InputItem(1, "member", read_bytes=lambda: png_bytes(1)),
             InputItem(2, "in-memory", data=png_bytes(2)),
             InputItem(3, "pil", data=Image.open(io.BytesIO(png_bytes(3))))]
    (batch,) = collect(items, 4)
    assert batch.num_decoded == 0
    for error in batch.errors:
        assert "6x5 pixels is over PIL's decompression-bomb limit of 20" in error.reason


def test_exif_orientation_is_applied_only_on_request():
    image = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displays 4 wide, 6 high
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    config = PreprocessConfig(do_resize=False)
    item = [InputItem(0, "rotated", data=buffer.getvalue())]
    with feed.batches(item, config, 1) as batches:
        assert next(batches).pixel_values.shape == (1, 3, 4, 6)
    with feed.batches(item, config, 1, decoding=ImageDecoding(exif_transpose=True)) as batches:
        transposed = next(batches).pixel_values
    assert transposed.shape == (1, 3, 6, 4)
    upright = load_and_preprocess_one(image.transpose(Image.Transpose.ROTATE_270), config)
    np.testing.assert_array_equal(transposed[0], upright)


def test_errors_of_the_item_iterator_reach_the_consumer_in_place():
    def items():
        yield InputItem(0, "a", data=png_bytes(0))
        raise DataError("list.txt: cannot read the path list")

    with feed.batches(items(), CONFIG, 1, num_threads=1) as batches:
        assert next(batches).num_decoded == 1
        with pytest.raises(DataError, match="list.txt"):
            next(batches)


def test_read_ahead_is_bounded_for_endless_inputs():
    listed = []

    def endless():
        for index in itertools.count():
            listed.append(index)
            yield InputItem(index, f"img{index}", data=png_bytes(0))

    with feed.batches(endless(), CONFIG, 4, num_threads=2, prefetch=2) as batches:
        first, second = next(batches), next(batches)
    assert [item.index for item in first.items + second.items] == list(range(8))
    # Two batches taken; at most 2 more ready, one being built and a window of 8 decoding.
    assert len(listed) <= 8 + 8 + 4 + 8


@pytest.mark.parametrize("name,value", [("batch_size", 0), ("num_threads", 0),
                                        ("prefetch", 0)])
def test_bad_sizes_are_one_line_errors(name, value):
    kwargs = {"batch_size": 2, name: value}
    batch_size = kwargs.pop("batch_size")
    with pytest.raises(ValueError, match=f"{name} must be at least 1, got 0"):
        with feed.batches([], CONFIG, batch_size, **kwargs):
            pass


def test_image_read_errors_name_the_item():
    with pytest.raises(ImageReadError, match="^shard.tar/x.jpg: not an image"):
        feed.decode_item(InputItem(0, "shard.tar/x.jpg"), b"junk", CONFIG)


def every_source(tmp_path) -> list[InputItem]:
    """One item of each way an image reaches the feed, plus broken ones."""
    path = tmp_path / "file.png"
    path.write_bytes(png_bytes(0))
    return [InputItem(0, str(path)),
            InputItem(1, "bytes", data=png_bytes(1)),
            InputItem(2, "pil", data=Image.open(io.BytesIO(png_bytes(2)))),
            InputItem(3, "fetched", fetch=lambda: png_bytes(3), size=100),
            InputItem(4, "member", read_bytes=lambda: png_bytes(4)),
            InputItem(5, "broken", data=b"not an image"),
            InputItem(6, str(tmp_path / "missing.png"))]


@pytest.mark.parametrize("config", [CONFIG, PreprocessConfig(do_resize=False)],
                         ids=["resized", "own size"])
def test_decode_processes_give_the_threads_pixels_and_errors(tmp_path, config):
    # "own size" pixels do not fit a fixed slot: they travel back through the pool's pipe.
    results = {}
    for processes in (False, True):
        with feed.batches(every_source(tmp_path), config, 8, num_threads=2,
                          decode_processes=processes) as batches:
            (batch,) = list(batches)
        results[processes] = batch
    threads, processes = results[False], results[True]
    assert processes.num_decoded == threads.num_decoded == 5
    np.testing.assert_array_equal(processes.pixel_values, threads.pixel_values)
    assert [(type(e), e.path, e.reason) if e else None for e in processes.errors] == [
        (type(e), e.path, e.reason) if e else None for e in threads.errors]
    assert processes.errors[5].reason == threads.errors[5].reason != ""


class _EndsTheProcess:
    """Unpickling it ends the process that unpickles it (a decoder crashing on an image)."""

    def __reduce__(self):
        import os
        return os._exit, (1,)


def test_a_decoding_process_that_dies_is_a_one_line_error():
    # "fine" decodes on the other process, and goes out first (input order).
    items = [InputItem(0, "fine", data=png_bytes(0)), InputItem(1, "crasher",
                                                               data=_EndsTheProcess())]
    with pytest.raises(CaptionerError, match=r"^a decoding process ended abruptly \(exit "
                                             r"status 1\) while decoding crasher$"):
        collect(items, 2, decode_processes=True)


def test_a_dead_decoding_process_names_its_image_and_stops_the_pool():
    processes = DecodeProcesses(2, CONFIG, ImageDecoding())
    try:
        processes.decode(png_bytes(0), "decoded before")
        with pytest.raises(CaptionerError, match=r"while decoding crasher$"):
            processes.decode(_EndsTheProcess(), "crasher")
        # The other process is alive, but the run cannot go on without an image: every later
        # image gets the same error, naming the crasher.
        for _ in range(2):
            with pytest.raises(CaptionerError, match=r"while decoding crasher$"):
                processes.decode(png_bytes(1), "after")
    finally:
        processes.close()


def test_a_killed_decoding_process_is_named_as_killed_not_blamed_on_the_script():
    processes = DecodeProcesses(1, CONFIG, ImageDecoding())
    try:
        processes.decode(png_bytes(0), "decoded before")
        os.kill(processes._processes[0].pid, signal.SIGKILL)  # as the out-of-memory killer
        with pytest.raises(CaptionerError, match=r"^a decoding process was killed by SIGKILL "
                                                 r"(before it got|while decoding) next$"):
            processes.decode(png_bytes(1), "next")
    finally:
        processes.close()


def test_decoding_processes_that_die_together_each_name_their_image():
    processes = DecodeProcesses(2, CONFIG, ImageDecoding())
    both_submitting = threading.Barrier(2)
    messages = []

    def decode(name):
        # Both send their images within microseconds, before either process has started
        # (a fresh interpreter): neither has died yet.
        both_submitting.wait()
        with pytest.raises(CaptionerError) as error:
            processes.decode(_EndsTheProcess(), name)
        messages.append(str(error.value))

    threads = [threading.Thread(target=decode, args=(name,)) for name in ("a", "b")]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        processes.close()
    assert sorted(messages) == [
        "a decoding process ended abruptly (exit status 1) while decoding a",
        "a decoding process ended abruptly (exit status 1) while decoding b"], messages


def test_decode_processes_import_with_the_callers_path(tmp_path, monkeypatch):
    # A source whose class lives in a module that only the caller's import path reaches (set
    # at run time, not through PYTHONPATH): the processes unpickle it with that path. Each
    # process is a fresh interpreter, and nothing of the caller's main script is run again.
    (tmp_path / "caller_only_module.py").write_text("class Encoded(bytes):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import caller_only_module

    processes = DecodeProcesses(1, CONFIG, ImageDecoding())
    try:
        pixels, seconds = processes.decode(caller_only_module.Encoded(png_bytes(0)), "encoded")
    finally:
        processes.close()
    np.testing.assert_array_equal(pixels, load_and_preprocess_one(png_bytes(0), CONFIG))
    assert seconds > 0


def test_a_script_decodes_in_processes_without_a_main_guard(tmp_path):
    # Its work at the top level, as a first script is written: the processes do not run it
    # again (multiprocessing's spawn and forkserver children would, and fail).
    png = tmp_path / "image.png"
    png.write_bytes(png_bytes(0))
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from flax_captioner import feed\n"
        "from flax_captioner.preprocess import PreprocessConfig\n"
        "from flax_captioner.sources import InputItem\n"
        f"items = [InputItem(index, {str(png)!r}) for index in range(6)]\n"
        "with feed.batches(items, PreprocessConfig(size=(4, 4)), 3, num_threads=2,\n"
        "                  decode_processes=True) as batches:\n"
        "    print('decoded', sum(batch.num_decoded for batch in batches))\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "decoded 6\n", "")


def test_decode_processes_leave_no_shared_memory_behind(tmp_path):
    before = set(os.listdir("/dev/shm"))
    collect(every_source(tmp_path), 2, decode_processes=True)
    assert set(os.listdir("/dev/shm")) - before == set()
