"""Writes the "shapes" captioning dataset: small images of coloured shapes and their captions.

Each 64x64 image holds one to three shapes (circle, square, triangle) in one of four colours,
in a row or a column (``flax_captioner.testing`` draws them):

    a red circle
    a blue square left of a yellow triangle
    a green triangle above a red circle above a blue square

The output is deterministic for a given seed:

    OUT/images/<split>_<index>.png
    OUT/<split>.jsonl          one {"image": "images/...", "caption": "..."} per line

Usage: python -m scripts.make_shapes_dataset OUT --train 6000 --validation 300 --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flax_captioner.testing import make_dataset


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
