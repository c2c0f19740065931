"""Writes the "shapes" captioning dataset: small images of coloured shapes and their captions.

Each 64x64 image holds one to three shapes (circle, square, triangle; 16 to 32 pixels, on an
8-pixel grid) in one of four colours, in a row (captioned "left of") or a column (captioned
"above"), on a dark background with noise:

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

IMAGE_SIZE = 64
# Shapes sit on this grid (the shipped model's ViT patch size): a shape then covers whole
# patches, so the tiny encoder learns shapes from few examples.
GRID = 8
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
# Shape sizes (pixels, whole grid cells) allowed for 1, 2 and 3 shapes in an image.
SIZES = {1: (16, 24, 32), 2: (16, 24), 3: (16,)}


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
    size = int(rng.choice(SIZES[count]))

    # Free grid cells along the layout axis, spread at random over the gaps before, between
    # (at least one cell, so shapes never touch) and after the shapes.
    cells = IMAGE_SIZE // GRID
    free = cells - count * size // GRID - (count - 1)
    gaps = np.bincount(rng.integers(0, count + 1, size=free), minlength=count + 1)
    along = []
    cursor = int(gaps[0])
    for index in range(count):
        along.append(cursor * GRID)
        cursor += size // GRID + 1 + int(gaps[index + 1])
    across = int(rng.integers(0, cells - size // GRID + 1)) * GRID

    scale = SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(0, 70, size=3))
    image = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), background)
    draw = ImageDraw.Draw(image)
    for start, shape, colour_name in zip(along, shapes, colours):
        left, top = (start, across) if layout == "row" else (across, start)
        centre = ((left + size / 2) * scale, (top + size / 2) * scale)
        jitter = rng.integers(-20, 21, size=3)
        colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour_name], jitter))
        # One pixel of margin inside the cells keeps neighbouring shapes apart.
        draw_shape(draw, shape, centre, (size - 2) * scale, colour)

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


def write_jpegs(directory: str | Path, count: int, *, seed: int = 0) -> list[Path]:
    """``count`` shapes images as JPEG files ``directory/shapes_NNNNN.jpg`` (no captions), the
    photo-like encoding the pipeline benchmarks and object-store tests read."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        image, _ = render_example(rng)
        paths.append(directory / f"shapes_{index:05d}.jpg")
        image.convert("RGB").save(paths[-1], quality=95)
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
