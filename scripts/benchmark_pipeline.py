"""End-to-end captioning throughput: JPEG files on disk -> captions, this pipeline vs PyTorch.

For each model, the same JPEG files go through ``flax_captioner.pipeline.run_pipeline``
(decoding threads + compiled generator; decode and device time reported separately) and
through transformers' ``pipeline("image-to-text")`` in PyTorch with the same batch size and
search settings. Both are warmed up first (compilation and first-call costs are excluded).

Models:
  shapes  examples/shapes-captioner (skipped when absent)
  full    the nlpconnect architecture (ViT-B/16 + GPT-2 12x768) with random weights, built
          with flax_captioner.testing.make_full_size_checkpoint in a temporary directory
  PATH    any checkpoint directory

Remote source (``--remote-shards``): the shapes model captions N shapes JPEGs packed as tar
shards, read from a local S3 server (moto, through s3fs, as a user's bucket) and from local
disk, in alternating rounds; the remote run should keep >= 90% of the local images/s.

Usage:
  python -m scripts.benchmark_pipeline --models shapes full --images 64 --batch-size 8
  python -m scripts.benchmark_pipeline --models full --images 16 --json
  python -m scripts.benchmark_pipeline --remote-shards 2000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from flax_captioner.testing import make_full_size_checkpoint, write_shapes_jpegs
from scripts.common import SHAPES_MODEL, machine, rotated, write_photo_jpegs


def benchmark_flax(model_dir: str, paths: list[str], args: argparse.Namespace,
                   work_dir: Path) -> dict:
    """This pipeline on ``paths``, after a warm-up batch that compiles."""
    from flax_captioner import CaptionOptions
    from flax_captioner.captioner import Captioner
    from flax_captioner.pipeline import run_pipeline

    captioner = Captioner.from_pretrained(model_dir, parallelism=args.parallelism)
    common = CaptionOptions(batch_size=args.batch_size, decode_threads=args.threads,
                            decode_processes=False, resume=False, progress=False,
                            num_beams=args.num_beams, max_length=args.max_length)
    # Compiles the full-batch program; the timed run's last batch is padded to reuse it.
    run_pipeline(paths[: args.batch_size], str(work_dir / "warmup.jsonl"), common, captioner)
    output = work_dir / "flax.jsonl"
    stats = run_pipeline(paths, str(output), common, captioner)
    captions = [json.loads(line).get("caption") for line in output.read_text().splitlines()]
    return {
        "images_per_second": stats.images_per_second,
        "wall_seconds": stats.wall_seconds,
        "decode_seconds": stats.decode_seconds,
        "decode_threads": stats.decode_threads,
        "device_seconds": stats.device_seconds,
        "input_wait_seconds": stats.input_wait_seconds,
        "errors": stats.errors,
        "captions": captions,
    }


def benchmark_torch(model_dir: str, paths: list[str], args: argparse.Namespace) -> dict:
    """transformers' image-to-text pipeline on ``paths``, after a warm-up batch; and its
    decoding + preprocessing alone."""
    import torch
    from transformers import ViTImageProcessor, pipeline

    captioner = pipeline("image-to-text", model=model_dir, device="cpu",
                         dtype=torch.float32)
    # The image-to-text pipeline sets max_new_tokens=256, which overrides max_length; the
    # decoder prompt is [decoder_start], so max_length - 1 new tokens is the same limit.
    generate_kwargs = {"num_beams": args.num_beams, "max_new_tokens": args.max_length - 1}
    captioner(paths[: args.batch_size], batch_size=args.batch_size,
              generate_kwargs=generate_kwargs)
    started = time.perf_counter()
    outputs = captioner(paths, batch_size=args.batch_size, generate_kwargs=generate_kwargs)
    wall = time.perf_counter() - started
    # Decoding + preprocessing alone, as the PyTorch pipeline does it (one thread).
    processor = ViTImageProcessor.from_pretrained(model_dir)
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            processor(images=image.convert("RGB"), return_tensors="pt")
    decode = time.perf_counter() - started
    return {
        "images_per_second": len(paths) / wall,
        "wall_seconds": wall,
        "decode_seconds": decode,
        "torch_threads": torch.get_num_threads(),
        "captions": [output[0]["generated_text"].strip() for output in outputs],
    }


def write_shards(paths: list[str], directory: Path, per_shard: int) -> list[Path]:
    """``paths`` packed in order into WebDataset shards shard-NNNN.tar of ``per_shard``."""
    import tarfile

    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(paths), per_shard):
        shard = directory / f"shard-{start // per_shard:04d}.tar"
        with tarfile.open(shard, "w") as archive:
            for path in paths[start:start + per_shard]:
                archive.add(path, arcname=Path(path).name)
        shards.append(shard)
    return shards


def benchmark_remote_shards(args: argparse.Namespace, work_dir: Path) -> dict:
    """The same tar shards from local disk and from a local S3 server, alternating rounds."""
    import s3fs

    from flax_captioner import CaptionOptions
    from flax_captioner.captioner import Captioner
    from flax_captioner.pipeline import run_pipeline
    from flax_captioner.testing import moto_s3

    paths = [str(path) for path in write_shapes_jpegs(work_dir / "shapes", args.remote_shards)[0]]
    shards = write_shards(paths, work_dir / "shards", args.shard_size)
    pattern = f"shard-{{0000..{len(shards) - 1:04d}}}.tar"
    captioner = Captioner.from_pretrained(str(SHAPES_MODEL), parallelism=args.parallelism)
    # The server runs in its own process, as a real store would not share this one's GIL.
    with moto_s3(own_process=True) as endpoint:
        options = {"endpoint_url": endpoint}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        fs.put([str(shard) for shard in shards], "bench/shards/")
        sources = {"local": str(work_dir / "shards" / pattern),
                   "s3": f"s3://bench/shards/{pattern}"}
        common = CaptionOptions(batch_size=args.batch_size, decode_threads=args.threads,
                                decode_processes=False, resume=False, progress=False,
                                storage_options=options, num_beams=args.num_beams,
                                max_length=args.max_length)
        run_pipeline([str(shards[0])], str(work_dir / "warmup.jsonl"), common, captioner)
        runs: dict[str, list[float]] = {name: [] for name in sources}
        captions = {}
        for round_index in range(args.rounds):
            for name in rotated(list(sources), round_index):
                output = work_dir / f"{name}.jsonl"
                stats = run_pipeline([sources[name]], str(output), common, captioner)
                runs[name].append(stats.images_per_second)
                captions[name] = [json.loads(line).get("caption")
                                  for line in output.read_text().splitlines()]
    local, remote = (float(np.median(runs[name])) for name in ("local", "s3"))
    # Each round's pair ran back to back, so its ratio cancels the load drifting between
    # rounds on a shared machine; the median of those ratios is the figure to compare.
    ratios = [s3 / disk for s3, disk in zip(runs["s3"], runs["local"])]
    return {"images": len(paths), "shards": len(shards), "batch_size": args.batch_size,
            "rounds": args.rounds, "images_per_second": runs, "local_median": local,
            "s3_median": remote, "round_ratios": ratios,
            "s3_over_local": float(np.median(ratios)),
            "same_captions": sum(a == b for a, b in zip(captions["local"], captions["s3"]))}


def resolve_model(name: str, work_dir: Path) -> tuple[str | None, str]:
    """(checkpoint directory or None when unavailable, kind of images to caption)."""
    if name == "shapes":
        return (str(SHAPES_MODEL) if SHAPES_MODEL.is_dir() else None), "shapes"
    if name == "full":
        return str(make_full_size_checkpoint(work_dir / "full-size-random")), "photos"
    return name, "photos"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["shapes", "full"],
                        help="shapes, full, or checkpoint directories [shapes full]")
    parser.add_argument("--images", type=int, default=64, help="JPEG files per model [64]")
    parser.add_argument("--image-dir", default=None,
                        help="caption these JPEGs instead of generated ones")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="decoding threads of this pipeline [all cores]")
    parser.add_argument("--parallelism", default="mesh", choices=("mesh", "pmap", "none"))
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--remote-shards", type=int, default=None, metavar="N",
                        help="instead: N shapes images as tar shards, local S3 server vs "
                             "local disk (needs the [s3] extra and moto[server])")
    parser.add_argument("--shard-size", type=int, default=250, help="images per shard [250]")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating local/S3 rounds for --remote-shards [2]")
    args = parser.parse_args()
    if args.remote_shards:
        with tempfile.TemporaryDirectory() as temporary:
            result = benchmark_remote_shards(args, Path(temporary))
        if args.json:
            print(json.dumps(result, indent=2))
            return
        print(f"tar shards -> captions, shapes model, {result['images']} images in "
              f"{result['shards']} shards, batch {result['batch_size']} ({machine()})")
        for name in ("local", "s3"):
            rounds = " ".join(f"{value:.1f}" for value in result["images_per_second"][name])
            print(f"{name:<6} images/s per round: {rounds}; median "
                  f"{result[name + '_median']:.1f}")
        print("s3 / local per round: "
              + " ".join(f"{ratio:.3f}" for ratio in result["round_ratios"]))
        print(f"s3 / local (median of rounds): {result['s3_over_local']:.3f}; same captions "
              f"{result['same_captions']}/{result['images']}")
        return

    results = []
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = Path(temporary)
        for name in args.models:
            model_dir, image_kind = resolve_model(name, work_dir)
            if model_dir is None:
                print(f"{name}: {SHAPES_MODEL} not found, skipped", file=sys.stderr)
                continue
            if args.image_dir:
                paths = sorted(str(path) for path in Path(args.image_dir).glob("*.jp*g"))
                paths = paths[: args.images]
            elif image_kind == "shapes":
                paths = [str(path) for path in write_shapes_jpegs(work_dir / "shapes",
                                                                  args.images)[0]]
            else:
                paths = write_photo_jpegs(work_dir / "photos", args.images)
            result = {"model": Path(name).name, "images": len(paths), "batch_size": args.batch_size,
                      "num_beams": args.num_beams, "max_length": args.max_length,
                      "flax": benchmark_flax(model_dir, paths, args, work_dir)}
            if not args.no_torch:
                result["torch"] = benchmark_torch(model_dir, paths, args)
                result["speedup"] = (result["flax"]["images_per_second"]
                                     / result["torch"]["images_per_second"])
                result["same_captions"] = sum(
                    flax == torch for flax, torch in
                    zip(result["flax"]["captions"], result["torch"]["captions"]))
            results.append(result)

    if args.json:
        print(json.dumps({"machine": machine(), "results": results}, indent=2))
        return
    print(f"end-to-end captioning, JPEG files -> captions ({machine()})")
    header = (f"{'model':<8} {'images':>6} {'flax img/s':>10} {'decode s':>9} {'device s':>9} "
              f"{'wait s':>7} {'torch img/s':>11} {'torch decode s':>14} {'ratio':>6} "
              f"{'same captions':>13}")
    print(header)
    for result in results:
        flax, torch = result["flax"], result.get("torch")
        torch_columns = (f"{torch['images_per_second']:>11.2f} {torch['decode_seconds']:>14.2f} "
                         f"{result['speedup']:>5.2f}x "
                         f"{result['same_captions']:>6}/{result['images']:<6}"
                         if torch else f"{'-':>11} {'-':>14} {'-':>6} {'-':>13}")
        print(f"{result['model']:<8} {result['images']:>6} {flax['images_per_second']:>10.2f} "
              f"{flax['decode_seconds']:>9.2f} {flax['device_seconds']:>9.2f} "
              f"{flax['input_wait_seconds']:>7.2f} {torch_columns}")
    print("decode s: image decoding + preprocessing, summed over decoding threads; device s: "
          "generate until outputs are on the host; wait s: device loop idle for input")


if __name__ == "__main__":
    main()
