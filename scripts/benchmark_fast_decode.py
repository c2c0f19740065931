"""The fast decode path (``--fast-decode``) against the exact one: speed, pixels, captions.

1. Speed: photo-like JPEGs at each ``--sizes`` (width x height) through ``feed.batches`` with
   1 and ``--threads`` decode threads, exact and fast, runs interleaved (best of
   ``--repeats``); images/s and the fast/exact ratio.
2. Pixels: mean and max |fast - exact| of the pixel values (range -1..1 for the
   nlpconnect preprocessing), per size.
3. Captions: the same images captioned both ways by ``--model`` (default: the shipped shapes
   model on ``--caption-images`` shapes images drawn at ``--upscale`` times its input size,
   JPEG quality 90, so the fast path decodes them at 1/``--upscale`` scale); the share of
   equal captions, and, for the shapes images, each path's exact-caption accuracy against
   the drawn captions. ``--images DIR`` captions a directory of your photos instead (for
   example with ``--model nlpconnect/vit-gpt2-image-captioning``).

Prints a table; ``--json PATH`` also writes every number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from flax_captioner import feed
from flax_captioner.preprocess import ImageDecoding, PreprocessConfig
from flax_captioner.sources import InputItem
from flax_captioner.testing import write_shapes_jpegs
from scripts.common import SHAPES_MODEL, machine, write_photo_jpegs

NLPCONNECT_PREPROCESSING = PreprocessConfig(size=(224, 224))  # its preprocessor_config.json


def decode_all(paths: list[str], config: PreprocessConfig, threads: int,
               decoding: ImageDecoding) -> np.ndarray:
    """float32[N, 3, H, W] of ``paths`` through the captioning feed."""
    items = [InputItem(index, path) for index, path in enumerate(paths)]
    with feed.batches(items, config, 32, num_threads=threads, decoding=decoding) as batches:
        return np.concatenate([batch.pixel_values[:batch.num_decoded] for batch in batches])


def measure_speed(directory: Path, sizes: list[tuple[int, int]], count: int, threads: int,
                  repeats: int) -> list[dict]:
    """Exact and fast decoding of photo-like JPEGs at each size, on 1 and ``threads``
    threads, runs interleaved; best of ``repeats``."""
    rows = []
    for width, height in sizes:
        paths = write_photo_jpegs(directory / f"{width}x{height}", count, (width, height))
        for workers in sorted({1, threads}):
            seconds: dict[bool, list[float]] = {False: [], True: []}
            pixels = {}
            for _ in range(repeats):  # interleaved, so load from other jobs falls on both
                for fast in (False, True):
                    started = time.perf_counter()
                    pixels[fast] = decode_all(paths, NLPCONNECT_PREPROCESSING, workers,
                                              ImageDecoding(fast=fast))
                    seconds[fast].append(time.perf_counter() - started)
            exact, fast = (count / min(seconds[mode]) for mode in (False, True))
            difference = np.abs(pixels[True] - pixels[False])
            rows.append({"width": width, "height": height, "threads": workers,
                         "images": count, "exact_images_per_second": exact,
                         "fast_images_per_second": fast, "fast_vs_exact": fast / exact,
                         "mean_abs_pixel_difference": float(difference.mean()),
                         "max_abs_pixel_difference": float(difference.max())})
    return rows


def measure_captions(model: str, paths: list[str], truth: list[str] | None,
                     batch_size: int) -> dict:
    """``paths`` captioned with exact and with fast decoding: equal captions, and each
    path's exact-caption accuracy against ``truth`` where given."""
    from flax_captioner.captioner import Captioner

    captioner = Captioner.from_pretrained(model)
    captions = {fast: captioner.caption(paths, batch_size=batch_size, fast_decode=fast)
                for fast in (False, True)}
    equal = sum(a == b for a, b in zip(captions[False], captions[True]))
    result = {"model": model, "images": len(paths), "captions_equal": equal,
              "captions_equal_share": equal / len(paths),
              "differing": [{"image": Path(path).name, "exact": a, "fast": b}
                            for path, a, b in zip(paths, captions[False], captions[True])
                            if a != b][:10]}
    if truth is not None:
        for fast in (False, True):
            correct = sum(a == b for a, b in zip(captions[fast], truth))
            result["fast_accuracy" if fast else "exact_accuracy"] = correct / len(paths)
    return result


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="640x480,1024x768,2048x1536,4032x3024",
                        help="photo sizes, WIDTHxHEIGHT, comma-separated")
    parser.add_argument("--speed-images", type=int, default=32, help="JPEGs per size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=str(SHAPES_MODEL))
    parser.add_argument("--images", type=Path, default=None,
                        help="caption these images (a directory) instead of shapes images")
    parser.add_argument("--caption-images", type=int, default=300)
    parser.add_argument("--upscale", type=int, default=8,
                        help="shapes images are drawn at this multiple of the model's input")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    sizes = [parse_size(size) for size in args.sizes.split(",") if size]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": machine()}
    with tempfile.TemporaryDirectory() as directory:
        report["speed"] = measure_speed(Path(directory), sizes, args.speed_images, args.threads,
                                        args.repeats)
        if args.images is not None:
            paths = sorted(str(path) for path in args.images.iterdir() if path.is_file())
            truth = None
        else:
            side = PreprocessConfig.from_pretrained(args.model).size[0] * args.upscale
            shapes, truth = write_shapes_jpegs(Path(directory) / "shapes", args.caption_images,
                                               seed=1, side=side, quality=90)
            paths = [str(path) for path in shapes]
        report["captions"] = measure_captions(args.model, paths, truth, args.batch_size)

    print(f"fast vs exact decoding, {report['machine']}, {report['date']}")
    print(f"{'JPEG size':>10} {'threads':>7} {'exact img/s':>12} {'fast img/s':>11} "
          f"{'fast/exact':>10} {'mean|d|':>8} {'max|d|':>7}")
    for row in report["speed"]:
        print(f"{row['width']}x{row['height']:<5} {row['threads']:>6} "
              f"{row['exact_images_per_second']:>12.1f} {row['fast_images_per_second']:>11.1f} "
              f"{row['fast_vs_exact']:>9.2f}x {row['mean_abs_pixel_difference']:>8.4f} "
              f"{row['max_abs_pixel_difference']:>7.3f}")
    captions = report["captions"]
    line = (f"captions ({captions['model']}, {captions['images']} images): "
            f"{captions['captions_equal']} equal ({100 * captions['captions_equal_share']:.1f}%)")
    if "exact_accuracy" in captions:
        line += (f"; exact-caption accuracy: exact path {100 * captions['exact_accuracy']:.1f}%,"
                 f" fast path {100 * captions['fast_accuracy']:.1f}%")
    print(line)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
