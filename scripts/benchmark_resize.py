"""Resize + normalise on the host (PIL) against the device function (flax_captioner.resize).

Decodes photo-like JPEGs (``--width`` x ``--height``) from memory with Pillow and, when
installed, nvImageCodec's CPU decoder (what the host still does with ``--resize-on-device``),
then times, best of --repeats:

  host      PIL resize + lookup-table normalise per image (``preprocess._pixel_values_into``,
            what every decode thread does today), one thread
  device    ``resize.pixel_values`` jitted on the default JAX backend for a batch of
            --batch-size canvases already on the device; compile time reported apart
  host prep what the device path leaves on the host: padding into canvases and the banded
            coefficients (cached per image size; the uncached cost of one size reported apart)

and checks that both give the same float32 values bit for bit. ``--json`` prints one JSON
object instead of a table; ``--smoke`` runs tiny sizes in seconds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import jax
import numpy as np

from flax_captioner import nvimagecodec, preprocess, resize
from flax_captioner.preprocess import PreprocessConfig
from flax_captioner.testing import NLPCONNECT_PREPROCESSOR
from scripts.common import jsonable, machine, timed, write_photo_jpegs


def best_seconds(call, repeats: int) -> float:
    """The fastest of ``repeats`` wall times of ``call()``."""
    return min(timed(call)[1] for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: a check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.width, args.height, args.batch_size, args.repeats = 64, 48, 2, 1
    side = resize.canvas_side(args.height, args.width)
    if side is None:
        parser.error(f"{args.width}x{args.height} is larger than the largest canvas "
                     f"({resize.CANVAS_SIDES[-1]}): such images stay on the host")

    config = PreprocessConfig.from_dict(NLPCONNECT_PREPROCESSOR)
    lut = preprocess.pixel_lut(config)
    with tempfile.TemporaryDirectory() as directory:
        paths = write_photo_jpegs(pathlib.Path(directory), args.batch_size,
                                  (args.width, args.height))
        images = [preprocess.load_image(path) for path in paths]
        encoded = [pathlib.Path(path).read_bytes() for path in paths]
        decode_ms = {"pillow": best_seconds(lambda: [preprocess.load_image(data)
                                                     for data in encoded], args.repeats)}
        if nvimagecodec.available():
            decode_ms["nvimagecodec"] = best_seconds(
                lambda: [nvimagecodec.decode_jpeg(data) for data in encoded], args.repeats)
    sizes = [(image.height, image.width) for image in images]
    host_out = np.empty((len(images), 3, *config.size), np.float32)

    def host() -> None:
        for image, out in zip(images, host_out):
            preprocess._pixel_values_into(image, config, lut, out)

    def host_prep() -> tuple[np.ndarray, resize.Coefficients]:
        canvases = np.stack([resize.pad_to_canvas(np.asarray(image), side) for image in images])
        return canvases, resize.batch_coefficients(sizes, side, config)

    resize.axis_coefficients.cache_clear()
    _, cold_seconds = timed(lambda: (resize.axis_coefficients(args.height, config.size[0],
                                                              config.resample),
                                     resize.axis_coefficients(args.width, config.size[1],
                                                              config.resample)))
    canvases, coefficients = jax.device_put(host_prep())
    device_lut = jax.device_put(lut)
    compiled, compile_seconds = timed(
        lambda: jax.jit(resize.pixel_values).lower(canvases, coefficients, device_lut).compile())

    def device() -> jax.Array:
        return compiled(canvases, coefficients, device_lut).block_until_ready()

    host()
    bit_identical = bool(np.array_equal(np.asarray(device()), host_out))
    per_image = 1e3 / len(images)
    report = {
        "machine": machine(),
        "backend": jax.devices()[0].device_kind,
        "image_size": [args.width, args.height],
        "canvas_side": side,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "bit_identical": bit_identical,
        "decode_ms_per_image": {name: seconds * per_image for name, seconds in decode_ms.items()},
        "host_ms_per_image": best_seconds(host, args.repeats) * per_image,
        "device_ms_per_image": best_seconds(device, args.repeats) * per_image,
        "host_prep_ms_per_image": best_seconds(host_prep, args.repeats) * per_image,
        "uncached_coefficients_ms_per_size": cold_seconds * 1e3,
        "compile_s": compile_seconds,
    }
    if args.json:
        print(json.dumps(report, indent=2, default=jsonable))
        return
    print(f"{args.width}x{args.height} -> {config.size[1]}x{config.size[0]}, {side} canvas, batch "
          f"{args.batch_size}, best of {args.repeats}, {report['machine']}, JAX on "
          f"{report['backend']}; bit-identical: {bit_identical}")
    rows = [*((f"decode: {name}", milliseconds)
              for name, milliseconds in report["decode_ms_per_image"].items()),
            ("host: PIL resize + table", report["host_ms_per_image"]),
            ("device: pixel_values", report["device_ms_per_image"]),
            ("device path's host prep", report["host_prep_ms_per_image"]),
            ("coefficients of a new size*", report["uncached_coefficients_ms_per_size"])]
    print(f"{'work':<30}{'ms/image':>10}")
    for name, milliseconds in rows:
        print(f"{name:<30}{milliseconds:>10.3f}")
    print(f"{'device compile (s)':<30}{compile_seconds:>10.2f}")
    print("* ms per (height, width) the cache has not seen, not per image")


if __name__ == "__main__":
    main()
