"""Builds the shipped "shapes" captioner end to end, reproducibly, on a CPU in minutes.

1. renders the shapes dataset (``flax_captioner.testing.make_dataset``) with a fixed seed;
2. trains a tiny GPT-2-style byte-level BPE tokenizer on the training captions;
3. writes a tiny random ViT encoder and GPT-2 decoder as pretrained directories;
4. trains them with ``flax_captioner.train`` (fresh cross-attention, as the recipe);
5. exports the model (Flax + PyTorch weights) and, with ``--ship``, copies it to
   examples/shapes-captioner/ and writes sample images with their captions to
   examples/images/.

Usage: python -m scripts.train_shapes WORK_DIR [--ship]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from flax_captioner.testing import EOS_TOKEN, GRID, IMAGE_SIZE, make_dataset, render_example
from scripts.common import SAMPLE_IMAGES, SHAPES_MODEL
# Enough merges that every caption word is one token ("Ġtriangle"), so the longest caption
# (13 words + EOS) fits the card's max_length=16.
TOKENIZER_VOCAB_SIZE = 320
DATA_SEED = 0
# The starting draw of the parts, the cross-attention and the data order; the recipe depends
# on it (docs/training.md, "Starting draws").
MODEL_SEED = 1
SAMPLE_SEED = 7
NUM_SAMPLES = 8


@dataclasses.dataclass(frozen=True)
class TinySizes:
    """The tiny ViT-GPT2: 64x64 images in 8x8 patches (64 tokens), 64 wide, no dropout (a
    model this small underfits; it does not overfit)."""

    hidden: int = 64
    encoder_layers: int = 3
    decoder_layers: int = 2
    heads: int = 4
    patch: int = GRID
    max_positions: int = 32


def train_tokenizer(captions: list[str], directory: Path) -> object:
    """A GPT-2-style byte-level BPE tokenizer trained on ``captions``; saved to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(captions, trainer)
    tokenizer = GPT2TokenizerFast(tokenizer_object=backend, bos_token=EOS_TOKEN,
                                  eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_pretrained_parts(work_dir: Path, tokenizer: object,
                           sizes: TinySizes) -> tuple[Path, Path]:
    """Writes a random tiny ViT (with preprocessor config) and GPT-2 (with tokenizer) as
    pretrained directories, in the Flax lineage's files (``config.json`` and
    ``flax_model.msgpack`` of ``FlaxViTModel`` / ``FlaxGPT2LMHeadModel``'s parameter trees).

    The weights are the project's own modules' initialisation (``modules.init_params``, HF's
    initialisers) of the joined captioner, seeded with MODEL_SEED: the encoder's tree as is,
    the decoder's without the cross-attention a plain GPT-2 does not have (training draws it
    fresh when it joins the two).
    """
    import copy

    import jax
    from flax.serialization import to_bytes
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig

    from flax_captioner import modules
    from flax_captioner.loading import FLAX_WEIGHTS
    from flax_captioner.preprocess import PreprocessConfig

    encoder_dir, decoder_dir = work_dir / "encoder", work_dir / "decoder"
    vit_config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=sizes.patch, hidden_size=sizes.hidden,
        num_hidden_layers=sizes.encoder_layers, num_attention_heads=sizes.heads,
        intermediate_size=4 * sizes.hidden)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    gpt2_config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=sizes.max_positions, n_embd=sizes.hidden,
        n_layer=sizes.decoder_layers, n_head=sizes.heads, bos_token_id=eos_id,
        eos_token_id=eos_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    # Joining sets is_decoder and add_cross_attention on the decoder config it is given:
    # copies, so the GPT-2 directory keeps a plain GPT-2 config.
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        copy.deepcopy(vit_config), copy.deepcopy(gpt2_config))
    params = jax.device_get(modules.init_params(config, MODEL_SEED))

    encoder_dir.mkdir(parents=True, exist_ok=True)
    vit_config.save_pretrained(encoder_dir)
    (encoder_dir / FLAX_WEIGHTS).write_bytes(to_bytes(params["encoder"]))
    PreprocessConfig(size=(IMAGE_SIZE, IMAGE_SIZE)).save_pretrained(encoder_dir)

    decoder_dir.mkdir(parents=True, exist_ok=True)
    gpt2_config.save_pretrained(decoder_dir)
    transformer = params["decoder"]["transformer"]
    blocks = {index: {name: value for name, value in block.items()
                      if name not in ("crossattention", "ln_cross_attn")}
              for index, block in transformer["h"].items()}
    (decoder_dir / FLAX_WEIGHTS).write_bytes(
        to_bytes({"transformer": {**transformer, "h": blocks}}))
    tokenizer.save_pretrained(decoder_dir)
    return encoder_dir, decoder_dir


def write_samples(directory: Path) -> None:
    """Writes NUM_SAMPLES images (seeded apart from the datasets) and captions.jsonl."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([SAMPLE_SEED])
    with (directory / "captions.jsonl").open("w") as rows:
        for index in range(NUM_SAMPLES):
            image, caption = render_example(rng)
            name = f"shapes_{index}.png"
            image.save(directory / name)
            rows.write(json.dumps({"image": name, "caption": caption}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--validation-images", type=int, default=300)
    parser.add_argument("--epochs", type=float, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--ship", action="store_true",
                        help="copy the export to examples/ and write the sample images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("flax_captioner").setLevel(logging.INFO)

    from flax_captioner.train import TrainConfig, train

    started = time.perf_counter()
    work_dir = args.work_dir
    splits = make_dataset(work_dir / "data", train=args.train_images,
                          validation=args.validation_images, seed=DATA_SEED)
    captions = [json.loads(line)["caption"] for line in splits["train"].open()]
    tokenizer = train_tokenizer(captions, work_dir / "tokenizer")
    encoder_dir, decoder_dir = write_pretrained_parts(work_dir, tokenizer, TinySizes())
    config = TrainConfig(
        train_file=str(splits["train"]), validation_file=str(splits["validation"]),
        output_dir=str(work_dir / "run"), encoder=str(encoder_dir), decoder=str(decoder_dir),
        max_target_length=16, batch_size=args.batch_size, num_epochs=args.epochs,
        learning_rate=args.learning_rate, warmup_steps=100, weight_decay=0.01,
        seed=MODEL_SEED, save_every=200, eval_every=0, num_beams=4, max_length=16)
    result = train(config)
    final = result.evaluations[-1]
    seconds = time.perf_counter() - started
    print(json.dumps({"steps": result.step, "exact_match": final.scores["exact_match"],
                      **{k: v for k, v in final.scores.items() if k != "exact_match"},
                      "eval_loss": final.loss, "seconds_total": round(seconds, 1),
                      "seconds_training_run": round(result.seconds, 1)}, indent=2))
    if args.ship:
        if SHAPES_MODEL.exists():
            shutil.rmtree(SHAPES_MODEL)
        shutil.copytree(result.export_dir, SHAPES_MODEL)
        write_samples(SAMPLE_IMAGES)
        size = sum(path.stat().st_size for path in SHAPES_MODEL.iterdir())
        print(f"shipped {SHAPES_MODEL} ({size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
