"""Parity with PyTorch: the same weights and pixels through ``VisionEncoderDecoderModel.generate``
and through our generator, compared caption by caption.

Needs PyTorch. Runs the JAX side at the highest matmul precision, as the reference does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from flax_captioner import loading
from flax_captioner.generator import GenerationOutput
from flax_captioner.settings import GenerationSettings

if TYPE_CHECKING:
    from flax_captioner.captioner import Captioner
    from flax_captioner.options import CaptionOptions
    from flax_captioner.sources import InputItem


@dataclasses.dataclass
class ImageParity:
    """One image's comparison (R = num_return_sequences rows).

    Attributes:
      index: the image's position among the images compared.
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
    """Per-image comparisons of one batch under one ``settings``.

    ``token_score_difference``: max |ours - PyTorch's| over the per-token scores;
    ``step_score_difference``: the same over the per-step scores (``output_scores``), on the
    steps both searches ran and the entries finite in both; None where not compared.
    ``names``: each compared image's name, when known; ``unreadable``: (name, reason) of each
    input that could not be read, so was not compared (``compare_inputs``).
    """

    settings: GenerationSettings
    images: list[ImageParity]
    token_score_difference: float | None = None
    step_score_difference: float | None = None
    names: list[str] | None = None
    unreadable: list[tuple[str, str]] = dataclasses.field(default_factory=list)

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


@contextlib.contextmanager
def pytorch_without_tf32() -> Iterator[None]:
    """PyTorch float32 as float32 on GPUs: TF32 off for matmuls and cuDNN (the ViT patch
    convolution; cuDNN allows TF32 by default), the previous settings restored afterwards."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def pytorch_generate_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    """``generate`` keyword arguments that reproduce ``settings`` in PyTorch.

    Every field of ``GenerationSettings`` is passed (lists where PyTorch wants lists), with
    ``return_dict_in_generate`` so scores, logits and beam indices come back.
    """
    kwargs = {field.name: getattr(settings, field.name)
              for field in dataclasses.fields(GenerationSettings)}
    kwargs.update(
        bad_words_ids=[list(word) for word in settings.bad_words_ids] or None,
        sequence_bias={ids: bias for ids, bias in settings.sequence_bias} or None,
        suppress_tokens=list(settings.suppress_tokens) or None,
        begin_suppress_tokens=list(settings.begin_suppress_tokens) or None,
        exponential_decay_length_penalty=settings.exponential_decay_length_penalty,
        output_scores=True, return_dict_in_generate=True)
    return kwargs


def pytorch_generate(model: Any, pixel_values: np.ndarray,
                     settings: GenerationSettings) -> GenerationOutput:
    """Runs PyTorch ``generate`` and returns our output layout (``from_pytorch_output``)."""
    import torch

    if settings.do_sample:
        raise ValueError("parity compares deterministic searches; do_sample must be false")
    with torch.no_grad(), pytorch_without_tf32():
        out = model.generate(pixel_values=torch.from_numpy(np.asarray(pixel_values, np.float32)),
                             **pytorch_generate_kwargs(settings))
    return from_pytorch_output(model, out, settings)


def from_pytorch_output(model: Any, out: Any, settings: GenerationSettings) -> GenerationOutput:
    """A ``return_dict_in_generate`` output of PyTorch ``generate`` in our layout.

    Sequences are padded to ``max_length`` with the pad PyTorch uses for that search; scores
    are ``sequences_scores`` for beam search and, for greedy search, the summed
    ``compute_transition_scores(..., normalize_logits=True)`` up to and including EOS;
    ``token_scores`` are those transition scores (beam search: along ``beam_indices``, which
    become per-image beam numbers); ``step_scores``/``step_logits`` stack PyTorch's per-step
    tuples on axis 1, NaN past the steps it ran.
    """
    import torch

    length = settings.max_length
    beam = settings.num_beams > 1
    fill = (settings.pad_token_id or settings.eos_token_id) if beam else settings.pad_token_id
    generated = out.sequences.numpy()
    rows, steps = generated.shape[0], generated.shape[1] - 1
    sequences = np.full((rows, length), fill, np.int32)
    sequences[:, :generated.shape[1]] = generated
    token_scores = np.zeros((rows, length), np.float32)
    beam_indices = None
    if beam:
        transition = model.compute_transition_scores(out.sequences, out.scores,
                                                     out.beam_indices).numpy()
        token_scores[:, 1:1 + transition.shape[1]] = transition
        indices = out.beam_indices.numpy()
        beam_indices = np.full((rows, length - 1), -1, np.int32)
        beam_indices[:, :indices.shape[1]] = np.where(indices >= 0,
                                                      indices % settings.num_beams, -1)
        scores = out.sequences_scores.numpy().astype(np.float32)
    else:
        transition = model.compute_transition_scores(out.sequences, out.scores,
                                                     normalize_logits=True)
        is_eos = out.sequences[:, 1:] == settings.eos_token_id
        ended_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
        transition = torch.where(ended_before == 0, transition, 0.0)
        token_scores[:, 1:1 + steps] = transition.numpy()
        scores = transition.sum(dim=1).numpy().astype(np.float32)

    def stacked(per_step: Any) -> np.ndarray | None:
        if not per_step:
            return None
        array = torch.stack(per_step, dim=1).numpy().astype(np.float32)
        padded = np.full(array.shape[:1] + (length - 1,) + array.shape[2:], np.nan, np.float32)
        padded[:, :array.shape[1]] = array
        return padded

    return GenerationOutput(sequences, scores, token_scores, beam_indices,
                            stacked(out.scores) if settings.output_scores else None,
                            stacked(out.logits) if settings.output_logits else None)


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
    token_difference = None
    if flax.token_scores is not None and pytorch.token_scores is not None:
        token_difference = float(np.max(np.abs(flax.token_scores - pytorch.token_scores),
                                        initial=0.0))
    step_difference = None
    if flax.step_scores is not None and pytorch.step_scores is not None:
        both = np.isfinite(flax.step_scores) & np.isfinite(pytorch.step_scores)
        difference = np.abs(np.where(both, flax.step_scores, 0.0)
                            - np.where(both, pytorch.step_scores, 0.0))
        step_difference = float(np.max(difference, initial=0.0))
    return ParityReport(settings=settings, images=images,
                        token_score_difference=token_difference,
                        step_score_difference=step_difference)


def compare_with_pytorch(captioner: Captioner, pixel_values: np.ndarray,
                         settings: GenerationSettings, *,
                         pytorch_model: Any = None) -> ParityReport:
    """Captions ``pixel_values`` [B, 3, H, W] with PyTorch and with ``captioner``'s generator
    (its compiled programs are reused).

    Args:
      captioner: the loaded ``Captioner`` (``Captioner.from_pretrained``).
      pixel_values: preprocessed images, float32.
      settings: a deterministic search (greedy or beam).
      pytorch_model: an already loaded ``VisionEncoderDecoderModel`` of the same weights
        (built from the captioner's parameters when omitted).
    """
    if pytorch_model is None:  # the very weights the captioner holds, whatever their file format
        pytorch_model = loading.pytorch_model(captioner.config, captioner.params)
    reference = pytorch_generate(pytorch_model, pixel_values, settings)
    with jax.default_matmul_precision("highest"):
        ours = captioner.generator.generate(pixel_values, settings)
    return compare_outputs(reference, ours, settings)


def compare_inputs(captioner: Captioner, items: Iterable[InputItem],
                   settings: GenerationSettings, options: CaptionOptions) -> ParityReport:
    """``compare_with_pytorch`` over every image of ``items`` (``sources.iter_inputs``),
    decoded as ``options`` say, a batch of ``options.batch_size`` at a time (None: the
    captioner's default). An image that cannot be read is listed in the report's
    ``unreadable`` and the others are compared."""
    pytorch_model = loading.pytorch_model(captioner.config, captioner.params)
    reports, names, unreadable = [], [], []
    # PyTorch takes float32 pixel values, so the host resizes (resize_on_device gives the
    # same values bit for bit).
    with captioner.batches(items, options.replace(resize_on_device=False)) as batches:
        for batch in batches:
            for item, error in zip(batch.items, batch.errors):
                if error is None:
                    names.append(item.name)
                else:
                    unreadable.append((item.name, error.reason))
            if batch.num_decoded:  # the pixels past them pad a last batch
                reports.append(compare_with_pytorch(
                    captioner, batch.pixel_values[:batch.num_decoded], settings,
                    pytorch_model=pytorch_model))
            batch.release()
    images = [dataclasses.replace(image, index=index) for index, image in enumerate(
        image for report in reports for image in report.images)]
    return ParityReport(
        settings=settings, images=images,
        token_score_difference=_largest(report.token_score_difference for report in reports),
        step_score_difference=_largest(report.step_score_difference for report in reports),
        names=names, unreadable=unreadable)


def _largest(values: Iterable[float | None]) -> float | None:
    """The largest of ``values`` that are not None; None when all are."""
    return max((value for value in values if value is not None), default=None)


def format_report(report: ParityReport, names: Sequence[str] | None = None) -> str:
    """The settings compared (those not at their default), one line per image (named by
    ``names``, else by the report's own), one per unreadable input, then the totals."""
    settings = report.settings
    changed = [f"{field.name}={getattr(settings, field.name)!r}"
               for field in dataclasses.fields(settings)
               if field.default is dataclasses.MISSING
               or getattr(settings, field.name) != field.default]
    lines = [f"settings: {', '.join(changed)}"]
    names = names if names is not None else report.names
    for image in report.images:
        name = names[image.index] if names is not None else f"image {image.index}"
        verdict = "match" if image.tokens_match else (
            f"DIFFER from generated token {image.first_differing_step}")
        lines.append(f"{name}: {verdict}, score difference {image.score_difference:.2e}")
    lines.extend(f"{name}: NOT COMPARED, unreadable: {reason}"
                 for name, reason in report.unreadable)
    unreadable = len(report.unreadable)
    lines.append(
        f"images matching: {report.images_matching}/{len(report.images)}; "
        f"captions matching: {report.captions_matching}/{report.captions}; "
        f"max score difference {report.max_score_difference:.2e}"
        + "".join(f"; max {label} difference {value:.2e}" for label, value in (
            ("token score", report.token_score_difference),
            ("step score", report.step_score_difference)) if value is not None)
        + (f"; {unreadable} {'input' if unreadable == 1 else 'inputs'} unreadable"
           if unreadable else ""))
    return "\n".join(lines)
