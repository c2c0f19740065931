"""How often do captions differ from PyTorch ``generate``: HF Flax ``generate`` vs ours.

Builds tiny random ViT-GPT2 checkpoints with a large decoder init (chaotic next-token
distributions, EOS at varied steps; the same ones tests/test_parity_generate.py uses), then
captions the same random images with PyTorch ``VisionEncoderDecoderModel.generate``,
``FlaxVisionEncoderDecoderModel.generate`` and ``flax_captioner``'s generator over a grid of
num_beams x length_penalty x early_stopping (plus greedy), float32 at the highest matmul
precision, and prints the share of returned captions that differ from PyTorch's. HF Flax is
``flax_captioner.hf_flax.to_flax_model`` of the loaded weights: transformers < 5 only (5.0
removed its Flax classes; the script says so and exits there).

    python -m scripts.measure_hf_flax_mismatch [--images 8] [--seeds 9 16 37] [--max-length 19]

(HF Flax turns an explicit ``max_length=20``, the library default, into 20 + the prompt
length, so the grid avoids 20.)
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import jax
import numpy as np

from flax_captioner import hf_flax, loading, parity
from flax_captioner.model import ModelSpec
from flax_captioner.generator import build_generate_fn
from flax_captioner.settings import GenerationSettings
from flax_captioner.testing import (CHAOTIC_SEEDS, CHAOTIC_VOCAB, chaotic_pixels,
                                    make_chaotic_checkpoint)

EOS = CHAOTIC_VOCAB - 1


def grid(max_length: int) -> list[dict]:
    beam = [dict(num_beams=beams, length_penalty=penalty, early_stopping=early,
                 num_return_sequences=beams, max_length=max_length)
            for beams, penalty, early in itertools.product(
                (2, 3, 4, 5), (0.5, 1.0, 2.0), (True, False, "never"))]
    return [dict(num_beams=1, max_length=max_length)] + beam


def hf_flax_generate_fn(flax_model, settings: GenerationSettings):
    """HF Flax ``generate`` for ``settings``, jitted with the params as an argument."""
    kwargs = dict(max_length=settings.max_length, num_beams=settings.num_beams,
                  num_return_sequences=settings.num_return_sequences,
                  length_penalty=settings.length_penalty, early_stopping=settings.early_stopping,
                  decoder_start_token_id=EOS, pad_token_id=EOS, eos_token_id=EOS)
    return jax.jit(lambda params, pixels: flax_model.generate(pixels, params=params,
                                                              **kwargs).sequences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(CHAOTIC_SEEDS))
    parser.add_argument("--max-length", type=int, default=19)
    args = parser.parse_args()
    if not hf_flax.available():
        import transformers

        raise SystemExit(f"measure_hf_flax_mismatch: transformers {transformers.__version__} "
                         "has no FlaxVisionEncoderDecoderModel (removed in 5.0); install "
                         "transformers<5 to measure HF Flax")
    jax.config.update("jax_default_matmul_precision", "highest")

    from transformers import VisionEncoderDecoderModel

    models = []
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            directory = make_chaotic_checkpoint(Path(workdir) / f"seed{seed}", seed)
            checkpoint = loading.load_checkpoint(directory)
            models.append((VisionEncoderDecoderModel.from_pretrained(directory).eval(),
                           hf_flax.to_flax_model(checkpoint.params, checkpoint.config),
                           chaotic_pixels(seed, args.images)))

    defaults = type("Defaults", (), dict(decoder_start_token_id=EOS, pad_token_id=EOS,
                                         eos_token_id=EOS))
    spec = ModelSpec.from_config(models[0][1].config)
    # Per search kind: captions, HF Flax differing, ours differing, then the same for the
    # best caption of each image only.
    totals = {"greedy": np.zeros(6, int), "beam": np.zeros(6, int)}
    print(f"{'settings':<44} {'captions':>8} {'HF differ':>9} {'ours differ':>11} "
          f"{'images':>6} {'HF best differs':>15} {'ours':>5}")
    for overrides in grid(args.max_length):
        settings = GenerationSettings.resolve(defaults, **overrides)
        ours_fn = jax.jit(build_generate_fn(spec, settings))
        hf_fn = hf_flax_generate_fn(models[0][1], settings)
        counts = np.zeros(6, int)
        rows = settings.num_return_sequences
        for torch_model, flax_model, pixels in models:
            reference = parity.pytorch_generate(torch_model, pixels, settings).sequences
            keys = np.zeros((len(pixels), 2), np.uint32)
            ours = np.asarray(ours_fn(flax_model.params, pixels, keys)[0])
            hf = np.asarray(hf_fn(flax_model.params, pixels)).reshape(ours.shape)
            hf_differs = (hf != reference).any(axis=1)
            ours_differs = (ours != reference).any(axis=1)
            counts += [len(reference), hf_differs.sum(), ours_differs.sum(),
                       len(pixels), hf_differs[::rows].sum(), ours_differs[::rows].sum()]
        totals["greedy" if settings.num_beams == 1 else "beam"] += counts
        label = ", ".join(f"{k[:14]}={v}" for k, v in overrides.items()
                          if k not in ("max_length", "num_return_sequences"))
        print(f"{label:<44} {counts[0]:>8} {counts[1]:>9} {counts[2]:>11} {counts[3]:>6} "
              f"{counts[4]:>15} {counts[5]:>5}", flush=True)
    for name, (captions, hf, ours, images, hf_best, ours_best) in totals.items():
        print(f"{name}: {captions} captions, HF Flax differs on {hf} ({hf / captions:.1%}), "
              f"flax_captioner on {ours} ({ours / captions:.1%}); best caption of {images} "
              f"images: HF Flax differs on {hf_best} ({hf_best / images:.1%}), "
              f"flax_captioner on {ours_best} ({ours_best / images:.1%})")


if __name__ == "__main__":
    main()
