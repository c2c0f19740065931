"""Decode + preprocess throughput: transformers' ViTImageProcessor against flax_captioner.preprocess.

Generates photo-like JPEGs (smooth colour fields plus grain) in a temporary directory, then times,
best of --repeats runs each:

  decode only            Image.open(p).convert("RGB"), one thread: the floor both sides share
  reference, per image   ViTImageProcessor(Image.open(p).convert("RGB")) one image per call (the card)
  reference, batched     the same, --batch-size images per call
  ours, 1 thread         feed.batches(items, num_threads=1): the decode threads every
  ours, all cores        feed.batches(items, num_threads=os.cpu_count())    caller uses
  ours, all processes    the same with decode_processes=True (the CLI's choice above 4 cores)
  ours, all processes,   the same decoding only (--resize-on-device: the compiled program
    decoding only        resizes and normalises)

and checks that both sides produce the same pixel values. Our rows are timed from the first
batch on, as a long captioning run sees the feed (the decode processes start and import this
script once, which a short run would count instead); the feed's consumer releases each batch,
as the captioning pipeline does. Prints images/s and ratios to the two reference rows, and for
our rows the CPU the calling process spent per image (its decode threads included; the decode
processes' own CPU not: what is left of the host for the device loop) and the whole host's
(every process, from /proc/stat: run it on an otherwise idle machine). ``--json`` prints one
JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from transformers import ViTImageProcessor

from flax_captioner import feed
from flax_captioner.preprocess import ImageDecoding, PreprocessConfig
from flax_captioner.sources import InputItem
from flax_captioner.testing import NLPCONNECT_PREPROCESSOR
from scripts.common import host_cpu_seconds, machine, process_cpu_seconds, write_photo_jpegs


def batches(paths: Sequence[str], batch_size: int) -> list[Sequence[str]]:
    return [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]


# (wall seconds, this process's CPU seconds, images, the host's CPU seconds or None)
Timing = tuple[float, float, int, float | None]


def best_timings(methods: dict[str, Callable[[], object]],
                 repeats: int, num_images: int) -> dict[str, Timing]:
    """Each method's fastest of ``repeats`` runs (by images/s), taking turns so that load from
    other processes on the machine falls on every method alike. A method that times itself
    returns its Timing; any other is timed whole, over ``num_images``."""
    timings: dict[str, list[Timing]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, run in methods.items():
            start, cpu, host_cpu = time.perf_counter(), process_cpu_seconds(), host_cpu_seconds()
            timing = run()
            if not isinstance(timing, tuple):
                timing = (time.perf_counter() - start, process_cpu_seconds() - cpu, num_images,
                          None if host_cpu is None else host_cpu_seconds() - host_cpu)
            timings[name].append(timing)
    return {name: max(values, key=lambda timing: timing[2] / timing[0])
            for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    if args.num_images <= args.batch_size:
        parser.error("our rows are timed from the first batch on: --num-images must exceed "
                     f"--batch-size ({args.batch_size})")

    processor = ViTImageProcessor.from_dict(NLPCONNECT_PREPROCESSOR)
    config = PreprocessConfig.from_dict(NLPCONNECT_PREPROCESSOR)
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as directory:
        paths = write_photo_jpegs(pathlib.Path(directory), args.num_images,
                                  (args.width, args.height))
        chunks = batches(paths, args.batch_size)

        def decode_only() -> None:
            for path in paths:
                Image.open(path).convert("RGB")

        def reference_per_image() -> np.ndarray:
            return np.concatenate(
                [processor(Image.open(path).convert("RGB"), return_tensors="np").pixel_values for path in paths]
            )

        def reference_batched() -> np.ndarray:
            return np.concatenate(
                [
                    processor([Image.open(path).convert("RGB") for path in chunk], return_tensors="np").pixel_values
                    for chunk in chunks
                ]
            )

        items = [InputItem(index, path) for index, path in enumerate(paths)]

        def ours(num_threads: int, processes: bool = False,
                 decoding: ImageDecoding = ImageDecoding()) -> Callable[[], Timing]:
            def run() -> Timing:
                with feed.batches(items, config, args.batch_size, num_threads=num_threads,
                                  decode_processes=processes, decoding=decoding) as decoded:
                    first = next(decoded)
                    start, cpu, host_cpu = (time.perf_counter(), process_cpu_seconds(),
                                            host_cpu_seconds())
                    first.release()
                    images = 0
                    for batch in decoded:
                        images += batch.num_decoded
                        batch.release()
                return (time.perf_counter() - start, process_cpu_seconds() - cpu, images,
                        None if host_cpu is None else host_cpu_seconds() - host_cpu)

            return run

        with feed.batches(items, config, args.batch_size, num_threads=cores) as decoded:
            pixel_values = np.concatenate([batch.pixel_values[:batch.num_decoded] for batch in decoded])
        max_abs_difference = float(np.abs(pixel_values - reference_per_image()).max())
        methods = {
            "decode only": decode_only,
            "reference, per image": reference_per_image,
            "reference, batched": reference_batched,
            "ours, 1 thread": ours(1),
            f"ours, {cores} threads": ours(cores),
            f"ours, {cores} processes": ours(cores, processes=True),
            f"ours, {cores} processes, decoding only": ours(
                cores, processes=True, decoding=ImageDecoding(device_resize=True)),
        }
        timings = best_timings(methods, args.repeats, args.num_images)

    images_per_second = {name: images / wall for name, (wall, _, images, _) in timings.items()}
    caller_cpu_ms = {name: 1e3 * cpu / images for name, (_, cpu, images, _) in timings.items()
                     if name.startswith("ours")}
    host_cpu_ms = {name: None if host is None else 1e3 * host / images
                   for name, (_, _, images, host) in timings.items()}
    baseline = images_per_second["reference, per image"]
    batched_baseline = images_per_second["reference, batched"]
    report = {
        "machine": machine(),
        "num_images": args.num_images,
        "image_size": [args.width, args.height],
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "max_abs_difference": max_abs_difference,
        "images_per_second": images_per_second,
        "caller_cpu_ms_per_image": caller_cpu_ms,
        "host_cpu_ms_per_image": host_cpu_ms,
        "ratio_to_reference_per_image": {name: value / baseline for name, value in images_per_second.items()},
        "ratio_to_reference_batched": {name: value / batched_baseline for name, value in images_per_second.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{args.num_images} JPEGs {args.width}x{args.height} -> 224x224, batch {args.batch_size}, "
        f"best of {args.repeats}, {report['machine']}; max |ours - reference| = {max_abs_difference:.2e}"
    )
    print(f"{'method':<40}{'images/s':>10}{'vs ref per image':>18}{'vs ref batched':>16}"
          f"{'caller CPU ms/image':>21}{'host CPU ms/image':>19}")
    for name, value in images_per_second.items():
        cpu = f"{caller_cpu_ms[name]:>21.2f}" if name in caller_cpu_ms else " " * 21
        host = host_cpu_ms[name]
        host_text = f"{host:>19.2f}" if host is not None else ""
        print(f"{name:<40}{value:>10.1f}{value / baseline:>17.2f}x"
              f"{value / batched_baseline:>15.2f}x{cpu}{host_text}")


if __name__ == "__main__":
    main()
