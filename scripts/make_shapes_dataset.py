"""Writes the "shapes" captioning dataset: small images of coloured shapes and their captions.

Each image holds one to three shapes (circle, square, triangle) in one of four colours, in a
row (captioned "left of") or a column (captioned "above"), on a dark background with noise:

    a red circle
    a blue square left of a yellow triangle
    a green triangle above a red circle above a blue square

The caption is a function of the image, so a captioner can reach exact-caption accuracy only
by looking. The output is deterministic for a given seed:

    OUT/images/<split>_<index>.png
    OUT/<split>.jsonl          one {"image": "images/...", "caption": "..."} per line

Usage: python scripts/make_shapes_dataset.py OUT --train 6000 --validation 300 --seed 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48
# Drawn at 4x and downsampled, so edges are anti-aliased the same way on every machine.
SUPERSAMPLE = 4
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"row": "left of", "column": "above"}
# Largest shape size (pixels) for 1, 2 and 3 shapes along the layout axis.
MAX_SIZE = {1: 22, 2: 17, 3: 13}
MIN_SIZE = {1: 12, 2: 11, 3: 10}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float],
               size: float, colour: tuple[int, int, int]) -> None:
    """Draws one filled shape of width ``size`` centred at ``centre`` (supersampled pixels)."""
    x, y = centre
    half = size / 2
    if shape == "circle":
        draw.ellipse((x - half, y - half, x + half, y + half), fill=colour)
    elif shape == "square":
        draw.rectangle((x - half, y - half, x + half, y + half), fill=colour)
    else:  # triangle, apex up
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=colour)


def render_example(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Draws one random image and returns it with its caption."""
    count = int(rng.integers(1, 4))
    layout = "row" if rng.random() < 0.5 else "column"
    shapes = [str(rng.choice(SHAPES)) for _ in range(count)]
    colours = [str(rng.choice(list(COLOURS))) for _ in range(count)]

    scale = SUPERSAMPLE
    canvas = IMAGE_SIZE * scale
    background = tuple(int(v) for v in rng.integers(0, 70, size=3))
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)

    segment = IMAGE_SIZE / count
    # Shapes share one cross-axis line (small jitter), so the relation is never ambiguous.
    cross_centre = rng.uniform(MAX_SIZE[count] / 2 + 2, IMAGE_SIZE - MAX_SIZE[count] / 2 - 2)
    for index, (shape, colour_name) in enumerate(zip(shapes, colours)):
        size = rng.uniform(MIN_SIZE[count], MAX_SIZE[count])
        slack = max(segment - size - 2, 0) / 2
        along = segment * (index + 0.5) + rng.uniform(-slack, slack)
        across = cross_centre + rng.uniform(-2, 2)
        centre = (along, across) if layout == "row" else (across, along)
        jitter = rng.integers(-20, 21, size=3)
        colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour_name], jitter))
        draw_shape(draw, shape, (centre[0] * scale, centre[1] * scale), size * scale, colour)

    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    noise = rng.normal(0.0, 6.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
    phrases = [f"a {colour} {shape}" for colour, shape in zip(colours, shapes)]
    caption = f" {RELATIONS[layout]} ".join(phrases)
    return Image.fromarray(pixels), caption


def write_split(out_dir: Path, split: str, count: int, rng: np.random.Generator) -> Path:
    """Renders ``count`` examples into ``out_dir/images`` and writes ``out_dir/<split>.jsonl``."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{split}.jsonl"
    with jsonl.open("w") as rows:
        for index in range(count):
            image, caption = render_example(rng)
            relative = f"images/{split}_{index:05d}.png"
            image.save(out_dir / relative)
            rows.write(json.dumps({"image": relative, "caption": caption}) + "\n")
    return jsonl


def make_dataset(out_dir: str | Path, *, train: int, validation: int, seed: int) -> dict[str, Path]:
    """Writes the train and validation splits; returns their JSONL paths by split name.

    Each split draws from its own stream (seeded by ``seed`` and the split), so changing one
    split's size leaves the other's images unchanged.
    """
    out_dir = Path(out_dir)
    paths = {}
    for stream, (split, count) in enumerate((("train", train), ("validation", validation))):
        if count:
            paths[split] = write_split(out_dir, split, count, np.random.default_rng([seed, stream]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=6000, help="training images")
    parser.add_argument("--validation", type=int, default=300, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, path in make_dataset(args.out_dir, train=args.train,
                                    validation=args.validation, seed=args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
