"""Parity with PyTorch: the same weights and pixels through ``VisionEncoderDecoderModel.generate``
and through our generator, compared caption by caption.

Needs PyTorch. Runs the JAX side at the highest matmul precision, as the reference does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flax_captioner import loading
from flax_captioner.generator import GenerationOutput, GenerationSettings


@dataclasses.dataclass
class ImageParity:
    """One image's comparison (R = num_return_sequences rows).

    Attributes:
      index: the image's position in the batch.
      tokens_match: all R sequences are equal token for token.
      score_difference: max |ours - PyTorch's| over the R scores.
      first_differing_step: the first generated-token index (1 = the token after
        ``decoder_start``) where some sequence differs; ``None`` when all match.
      pytorch_sequences, flax_sequences: int32 [R, max_length], padded with pad.
    """

    index: int
    tokens_match: bool
    score_difference: float
    first_differing_step: int | None
    pytorch_sequences: np.ndarray
    flax_sequences: np.ndarray


@dataclasses.dataclass
class ParityReport:
    """Per-image comparisons of one batch under one ``settings``."""

    settings: GenerationSettings
    images: list[ImageParity]

    @property
    def images_matching(self) -> int:
        return sum(image.tokens_match for image in self.images)

    @property
    def captions(self) -> int:
        return sum(len(image.flax_sequences) for image in self.images)

    @property
    def captions_matching(self) -> int:
        return sum(int(np.array_equal(ours, theirs))
                   for image in self.images
                   for ours, theirs in zip(image.flax_sequences, image.pytorch_sequences))

    @property
    def max_score_difference(self) -> float:
        return max((image.score_difference for image in self.images), default=0.0)

    @property
    def all_match(self) -> bool:
        return self.images_matching == len(self.images)


def pytorch_generate_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    """``generate`` keyword arguments that reproduce ``settings`` in PyTorch."""
    return dict(
        decoder_start_token_id=settings.decoder_start_token_id,
        pad_token_id=settings.pad_token_id, eos_token_id=settings.eos_token_id,
        max_length=settings.max_length, min_length=settings.min_length,
        num_beams=settings.num_beams, num_return_sequences=settings.num_return_sequences,
        length_penalty=settings.length_penalty, early_stopping=settings.early_stopping,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        repetition_penalty=settings.repetition_penalty,
        bad_words_ids=[list(word) for word in settings.bad_words_ids] or None,
        do_sample=False, output_scores=True, return_dict_in_generate=True)


def pytorch_generate(model: Any, pixel_values: np.ndarray,
                     settings: GenerationSettings) -> GenerationOutput:
    """Runs PyTorch ``generate`` and returns our output layout.

    Sequences are padded to ``max_length`` with the pad PyTorch uses for that search; scores
    are ``sequences_scores`` for beam search and, for greedy search, the summed
    ``compute_transition_scores(..., normalize_logits=True)`` up to and including EOS.
    """
    import torch

    if settings.do_sample:
        raise ValueError("parity compares deterministic searches; do_sample must be false")
    with torch.no_grad():
        out = model.generate(pixel_values=torch.from_numpy(np.asarray(pixel_values, np.float32)),
                             **pytorch_generate_kwargs(settings))
    fill = settings.pad_token_id
    if settings.num_beams > 1:
        fill = settings.pad_token_id or settings.eos_token_id
    generated = out.sequences.numpy()
    sequences = np.full((generated.shape[0], settings.max_length), fill, np.int32)
    sequences[:, :generated.shape[1]] = generated
    if settings.num_beams > 1:
        return GenerationOutput(sequences, out.sequences_scores.numpy().astype(np.float32))
    transition = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    is_eos = out.sequences[:, 1:] == settings.eos_token_id
    ended_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    scores = torch.where(ended_before == 0, transition, 0.0).sum(dim=1)
    return GenerationOutput(sequences, scores.numpy().astype(np.float32))


def compare_outputs(pytorch: GenerationOutput, flax: GenerationOutput,
                    settings: GenerationSettings) -> ParityReport:
    """Per-image comparison of two outputs of the same batch."""
    rows = settings.num_return_sequences
    images = []
    for index in range(len(flax.sequences) // rows):
        block = slice(index * rows, (index + 1) * rows)
        ours, theirs = flax.sequences[block], pytorch.sequences[block]
        differs = np.nonzero((ours != theirs).any(axis=0))[0]
        images.append(ImageParity(
            index=index,
            tokens_match=differs.size == 0,
            score_difference=float(np.max(np.abs(flax.scores[block] - pytorch.scores[block]))),
            first_differing_step=int(differs[0]) if differs.size else None,
            pytorch_sequences=theirs,
            flax_sequences=ours))
    return ParityReport(settings=settings, images=images)


def compare_with_pytorch(model_dir_or_captioner: str | os.PathLike | Any,
                         pixel_values: np.ndarray, settings: GenerationSettings, *,
                         pytorch_model: Any = None) -> ParityReport:
    """Captions ``pixel_values`` [B, 3, H, W] with PyTorch and with our generator.

    Args:
      model_dir_or_captioner: a checkpoint directory (or hub id), or a loaded ``Captioner``
        (its compiled programs are reused).
      pixel_values: preprocessed images, float32.
      settings: a deterministic search (greedy or beam).
      pytorch_model: an already loaded ``VisionEncoderDecoderModel`` of the same weights
        (built from the captioner's parameters when omitted).
    """
    from flax_captioner.captioner import Captioner

    captioner = model_dir_or_captioner
    if not isinstance(captioner, Captioner):
        captioner = Captioner.from_pretrained(model_dir_or_captioner, parallelism="none")
    if pytorch_model is None:  # the very weights the captioner holds, whatever their file format
        pytorch_model = loading.pytorch_model(captioner.checkpoint.directory,
                                              captioner.model.params)
    reference = pytorch_generate(pytorch_model, pixel_values, settings)
    with jax.default_matmul_precision("highest"):
        ours = captioner.generator.generate(pixel_values, settings)
    return compare_outputs(reference, ours, settings)


def format_report(report: ParityReport, names: Sequence[str] | None = None) -> str:
    """One line per image (named by ``names`` when given), then the totals."""
    lines = []
    for image in report.images:
        name = names[image.index] if names is not None else f"image {image.index}"
        verdict = "match" if image.tokens_match else (
            f"DIFFER from generated token {image.first_differing_step}")
        lines.append(f"{name}: {verdict}, score difference {image.score_difference:.2e}")
    lines.append(
        f"images matching: {report.images_matching}/{len(report.images)}; "
        f"captions matching: {report.captions_matching}/{report.captions}; "
        f"max score difference {report.max_score_difference:.2e}")
    return "\n".join(lines)
