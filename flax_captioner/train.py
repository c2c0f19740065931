"""Fine-tuning the captioner with optax: data-parallel, resumable, evaluated.

The recipe is the one the nlpconnect checkpoint was trained with (transformers'
``run_image_captioning_flax.py``): AdamW whose weight decay skips biases and LayerNorm, a
linear warmup then linear decay, optional label smoothing, the loss summed over tokens and
divided by the token count of the whole global batch. On top of it: gradient accumulation
(``optax.MultiSteps``), gradient clipping, ``jax.jit`` over a device ``Mesh`` instead of
``pmap``, orbax checkpoints that resume bit-identically, and a stop on a non-finite loss.

A run's position is one integer, ``micro_step`` (micro-batches consumed); the epoch, the
batch within it (the order is a pure function of seed and epoch) and the optimizer step all
derive from it, so a checkpoint of (params, optimizer state, rng, micro_step) is a complete
snapshot of the run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from tqdm.auto import tqdm

from flax_captioner import device_loop, feed, loading, metrics, modules, sharding, train_data
from flax_captioner.errors import DataError, ModelLoadError, NonFiniteLossError
from flax_captioner.generator import Generator
from flax_captioner.preprocess import PreprocessConfig
from flax_captioner.settings import GenerationSettings
from flax_captioner.sources import InputItem
from flax_captioner.train_config import TrainConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One evaluation: teacher-forced loss, captions and their scores.

    Attributes:
      step: optimizer step evaluated.
      loss: token-mean cross-entropy (label-smoothed as in training) on every validation row.
      scores: ``bleu4``, ``rougeL``, ``cider`` and ``exact_match`` of the captions.
      predictions: image path -> generated caption.
    """

    step: int
    loss: float
    scores: dict[str, float]
    predictions: dict[str, str]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``train`` returns.

    Attributes:
      step: optimizer steps done (the total, counting steps before a resume).
      steps_run: optimizer steps this invocation ran (0 when resumed at the end).
      train_loss: mean training loss over the last 20 steps read back (None if none ran here).
      evaluations: every evaluation of this invocation, in order.
      export_dir: the exported Hugging Face checkpoint; None when stopped at ``stop_at_step``.
      checkpoint_dir: the orbax checkpoints.
      skipped_images: unreadable images dropped, by split.
      seconds: wall time of this invocation.
      images: training images this invocation fed to the device (padding rows excluded).
      input_wait_seconds: time the training loop waited for decoded batches.
    """

    step: int
    steps_run: int
    train_loss: float | None
    evaluations: list[EvalResult]
    export_dir: Path | None
    checkpoint_dir: Path
    skipped_images: dict[str, int]
    seconds: float
    images: int = 0
    input_wait_seconds: float = 0.0

    def summary(self) -> str:
        """One line for the command line: step, losses, scores, where the model went."""
        if self.train_loss is not None:
            parts = [f"step {self.step}", f"train loss {self.train_loss:.4f}"]
        elif self.export_dir is not None:
            parts = [f"step {self.step}: the run had already finished (no training step left "
                     "to run)"]
        else:
            parts = [f"step {self.step} (no training step left to run)"]
        if self.evaluations:
            final = self.evaluations[-1]
            parts.append(f"eval loss {final.loss:.4f}")
            parts.extend(f"{name} {value:.4f}" for name, value in final.scores.items())
        skipped = sum(self.skipped_images.values())
        if skipped:
            parts.append(f"{skipped} unreadable image(s) skipped")
        parts.append(f"exported to {self.export_dir}" if self.export_dir
                     else f"stopped; resume from {self.checkpoint_dir}")
        return f"{', '.join(parts)} ({self.seconds:.0f} s)"


@flax.struct.dataclass
class TrainState:
    """The complete, checkpointed state of a run.

    Attributes:
      micro_step: micro-batches consumed (int32 scalar); gives epoch, batch and step.
      params: model parameters.
      opt_state: ``optax.MultiSteps`` state (accumulated gradients, AdamW moments, counts).
      rng: dropout PRNG key (uint32 [2]), split once per micro-step.
    """

    micro_step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """A model to train and what belongs with it (token ids are the model config's).

    Attributes:
      params: the starting parameter tree (float32).
      config: its ``VisionEncoderDecoderConfig``.
      tokenizer: the decoder's tokenizer.
      preprocess_config: the encoder's preprocessing.
      generation_config: the starting checkpoint's ``GenerationConfig``, exported with the
        model; None: derived from ``config``.
    """

    params: Any
    config: Any
    tokenizer: Any
    preprocess_config: PreprocessConfig
    generation_config: Any = None

    def module(self) -> modules.VisionEncoderDecoder:
        """The Flax module training runs (float32, dropout as the config sets it)."""
        return modules.VisionEncoderDecoder(modules.ModuleConfig.from_config(self.config))


def build_model(config: TrainConfig) -> ModelBundle:
    """Loads ``config.model``, or joins ``config.encoder`` and ``config.decoder``.

    A joined model gets fresh cross-attention (drawn from ``config.seed``) and, as in the
    recipe, decoder_start = bos and pad = eos of the decoder.

    Raises:
      ModelLoadError: neither or both ways given, or a checkpoint that does not load.
    """
    if bool(config.model) == bool(config.encoder and config.decoder):
        raise ModelLoadError("training needs either a model to fine-tune, or an encoder and a "
                             "decoder to join")
    if config.model:
        checkpoint = loading.load_checkpoint(config.model)
        return ModelBundle(checkpoint.params, checkpoint.config, checkpoint.tokenizer,
                           checkpoint.preprocess_config,
                           loading.read_generation_config(checkpoint.directory))
    from transformers import AutoTokenizer

    params, model_config = loading.load_pretrained_parts(config.encoder, config.decoder,
                                                         seed=config.seed)
    decoder_dir = loading.resolve_directory(config.decoder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{config.decoder}: its tokenizer could not be loaded "
                             f"({str(error).strip().splitlines()[0]})") from error
    decoder = model_config.decoder
    model_config.decoder_start_token_id = decoder.bos_token_id
    model_config.pad_token_id = decoder.eos_token_id
    model_config.eos_token_id = decoder.eos_token_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelBundle(params, model_config, tokenizer, PreprocessConfig.from_pretrained(
        loading.resolve_directory(config.encoder)))


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: every one but biases and LayerNorm."""
    flat = traverse_util.flatten_dict(params)
    layer_norm_names = ("layernorm", "layer_norm", "ln")
    layer_norm_paths = {path[-2:] for path in flat
                        if any(name in "".join(path).lower() for name in layer_norm_names)}
    return traverse_util.unflatten_dict(
        {path: path[-1] != "bias" and path[-2:] not in layer_norm_paths for path in flat})


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    warmup = min(config.warmup_steps, total_steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
         optax.linear_schedule(config.learning_rate, 0.0, max(total_steps - warmup, 1))],
        [warmup])


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Clipping + AdamW (masked decay) on the schedule, accumulated over micro-batches."""
    adamw = optax.adamw(learning_rate_schedule(config, total_steps), b1=config.adam_beta1,
                        b2=config.adam_beta2, eps=config.adam_epsilon,
                        weight_decay=config.weight_decay, mask=decay_mask)
    chain = (optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
             if config.max_grad_norm > 0 else adamw)
    return optax.MultiSteps(chain, every_k_schedule=config.gradient_accumulation_steps)


def token_loss(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array,
               label_smoothing: float) -> tuple[jax.Array, jax.Array]:
    """Label-smoothed cross-entropy summed over unmasked tokens, and their count.

    As in the recipe, the soft target's entropy is subtracted so a perfect prediction
    scores 0 whatever the smoothing.

    Args:
      logits: [B, T, V] float32.
      labels: [B, T] int32.
      loss_mask: [B, T] float32, 0 on padding tokens and padding rows.

    Returns:
      (loss_sum, token_count), float32 scalars.
    """
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab_size - 1)
    entropy = -(confidence * math.log(confidence)
                + (vocab_size - 1) * low_confidence * math.log(low_confidence + 1e-20))
    soft_labels = (jax.nn.one_hot(labels, vocab_size) * (confidence - low_confidence)
                   + low_confidence)
    losses = optax.softmax_cross_entropy(logits, soft_labels) - entropy
    return jnp.sum(losses * loss_mask), jnp.sum(loss_mask)


def _model_logits(model: modules.VisionEncoderDecoder, params: Any,
                  batch: dict[str, jax.Array], *, train: bool,
                  dropout_rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits float32[B, T, V]; dropout on when ``train``."""
    return model.apply({"params": params}, batch["pixel_values"], batch["decoder_input_ids"],
                       batch["decoder_attention_mask"], deterministic=not train,
                       rngs={"dropout": dropout_rng} if train else None)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               model: modules.VisionEncoderDecoder,
               optimizer: optax.GradientTransformation, label_smoothing: float
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One micro-batch: gradients of the global-token-mean loss, fed to the optimizer.

    Under ``jax.jit`` with the batch sharded over a mesh, the sums run over the global batch,
    so the loss is normalised by the global token count, as the recipe's ``psum`` does.

    Args:
      state: the run state (replicated).
      batch: ``pixel_values [B, 3, H, W]``, ``decoder_input_ids``, ``decoder_attention_mask``,
        ``labels`` [B, T] int32, ``loss_mask`` [B, T] float32.

    Returns:
      (new state, metrics): ``loss``, ``grad_norm`` and ``finite`` (loss, gradients and new
      parameters all finite).
    """
    rng, dropout_rng = jax.random.split(state.rng)

    def mean_loss(params: Any) -> jax.Array:
        logits = _model_logits(model, params, batch, train=True, dropout_rng=dropout_rng)
        loss_sum, count = token_loss(logits, batch["labels"], batch["loss_mask"], label_smoothing)
        return loss_sum / count

    loss, grads = jax.value_and_grad(mean_loss)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
    new_state = TrainState(micro_step=state.micro_step + 1, params=params,
                           opt_state=opt_state, rng=rng)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def eval_loss_step(params: Any, batch: dict[str, jax.Array], *,
                   model: modules.VisionEncoderDecoder,
                   label_smoothing: float) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced (loss_sum, token_count) of one batch (shapes as in ``train_step``)."""
    logits = _model_logits(model, params, batch, train=False)
    return token_loss(logits, batch["labels"], batch["loss_mask"], label_smoothing)


def _pad_indices(indices: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([indices, np.full(size - len(indices), -1, indices.dtype)])


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """How many micro-batches and optimizer steps the run takes."""

    batches_per_epoch: int
    total_steps: int

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a micro-step."""
        return divmod(micro_step, self.batches_per_epoch)


def plan_run(config: TrainConfig, num_rows: int) -> RunPlan:
    """Steps from ``max_steps`` or ``num_epochs`` (at least one step)."""
    per_epoch = train_data.batches_per_epoch(num_rows, config.batch_size)
    steps = config.max_steps or math.ceil(
        config.num_epochs * per_epoch / config.gradient_accumulation_steps)
    return RunPlan(per_epoch, max(steps, 1))


def _checkpoint_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    # Synchronous saves: a checkpoint is complete (renamed from its temporary name) when
    # save returns, so a kill at any moment leaves only whole checkpoints behind.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def _save(manager: ocp.CheckpointManager, step: int, state: TrainState, plan: RunPlan) -> None:
    micro_step = int(state.micro_step)
    epoch, batch = plan.position(micro_step)
    position = {"micro_step": micro_step, "epoch": epoch, "batch_in_epoch": batch}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               position=ocp.args.JsonSave(position)))


def _restore(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored.state


def initial_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: a copy of ``params``, a fresh optimizer state, the dropout key of ``seed``.

    The copy is the state's own: train steps donate their input state, and must not delete
    the model's parameters.
    """
    params = jax.tree.map(lambda leaf: jnp.array(leaf, copy=True), params)
    return TrainState(micro_step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed))


# Optimizer steps between reads of the training metrics. Reading them blocks the host until
# the device catches up; the host otherwise runs ahead, which is what keeps the device busy.
METRICS_EVERY = 10


class _MetricsWindow:
    """Device-side metrics of the micro-steps since the last read, and the recent losses."""

    def __init__(self, accumulation: int):
        self.accumulation = accumulation
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.recent_losses: list[float] = []

    def add(self, micro_step: int, step_metrics: dict[str, jax.Array]) -> None:
        self.pending.append((micro_step, step_metrics))

    def fetch(self) -> tuple[int, float] | None:
        """Reads the pending metrics to the host; (micro_step, loss) of the first non-finite
        one, else None."""
        fetched = jax.device_get([step_metrics for _, step_metrics in self.pending])
        micro_steps = [micro_step for micro_step, _ in self.pending]
        self.pending = []
        for micro_step, step_metrics in zip(micro_steps, fetched):
            if not bool(step_metrics["finite"]):
                return micro_step, float(step_metrics["loss"])
            self.recent_losses.append(float(step_metrics["loss"]))
        self.recent_losses = self.recent_losses[-20 * self.accumulation:]
        return None

    @property
    def mean_loss(self) -> float | None:
        """Mean of the last 20 steps' losses read back (None before any)."""
        return float(np.mean(self.recent_losses)) if self.recent_losses else None


class Trainer:
    """A training run: data, model, compiled steps and checkpoints of one ``TrainConfig``.

    ``run()`` trains to the planned step (resuming from the newest checkpoint in
    ``output_dir/checkpoints`` if there is one), evaluates and exports.
    """

    def __init__(self, config: TrainConfig):
        config.validate()
        config.check_paths()  # before the model loads
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.bundle = build_model(config)
        token_ids = loading.generation_defaults(self.bundle.config)
        self.token_ids = {"decoder_start_token_id": token_ids.decoder_start_token_id,
                          "pad_token_id": token_ids.pad_token_id,
                          "eos_token_id": token_ids.eos_token_id}
        self.train_set = self._load(config.train_file)
        self.validation_set = None
        if config.validation_file:
            metrics.require_scorers()  # before hours of training, not at the first evaluation
            self.validation_set = self._load(config.validation_file)
        self.plan = plan_run(config, len(self.train_set))
        self.placement = sharding.MeshDataParallel(jax.local_devices())
        self.optimizer = make_optimizer(config, self.plan.total_steps)
        self.schedule = learning_rate_schedule(config, self.plan.total_steps)
        model = self.bundle.module()
        self.train_step_fn = jax.jit(
            functools.partial(train_step, model=model, optimizer=self.optimizer,
                              label_smoothing=config.label_smoothing),
            donate_argnums=0)
        self.eval_loss_fn = jax.jit(functools.partial(
            eval_loss_step, model=model, label_smoothing=config.label_smoothing))
        # Evaluation captions go through the one captioning path, fed each evaluation's params.
        self.generator = Generator(self.bundle.params, self.bundle.config,
                                   data_parallel=self.placement)
        self.caption_settings = GenerationSettings.resolve(
            loading.generation_defaults(self.bundle.config), num_beams=config.num_beams,
            max_length=config.max_length)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.export_pytorch = loading.torch_available()
        if not self.export_pytorch:  # said now, not after hours of training
            logger.warning("PyTorch is not installed: the final export will hold Flax weights "
                           "only (install torch to add PyTorch weights)")

    def _load(self, path: str) -> train_data.CaptionDataset:
        config = self.config
        return train_data.load_caption_dataset(
            path, self.bundle.tokenizer, self.bundle.preprocess_config,
            max_target_length=config.max_target_length, image_root=config.image_root or None,
            image_column=config.image_column, caption_column=config.caption_column,
            **self.token_ids)

    def start_state(self, manager: ocp.CheckpointManager) -> TrainState:
        """The newest checkpoint's state, or step 0; replicated over the mesh."""
        state = initial_state(self.bundle.params, self.optimizer, self.config.seed)
        state = jax.device_put(state, self.placement.replicated)
        if manager.latest_step() is not None:
            state = _restore(manager, state)
            logger.info("resumed from %s at step %d (micro-step %d)", manager.directory,
                        manager.latest_step(), int(state.micro_step))
        return state

    def batch_indices(self, micro_step: int) -> np.ndarray:
        """int64[B] rows of a micro-step's batch (-1: padding): a pure function of (seed,
        micro_step); B is the batch size padded to the device count."""
        epoch, batch = self.plan.position(micro_step)
        indices = train_data.epoch_batch_indices(
            len(self.train_set), self.config.batch_size, seed=self.config.seed, epoch=epoch)[batch]
        return _pad_indices(indices, self.placement.padded_size(self.config.batch_size))

    def train_batch(self, micro_step: int) -> dict[str, np.ndarray]:
        """The host batch of one micro-step (decoded through the feed)."""
        size = self.placement.padded_size(self.config.batch_size)
        with train_data.batches(self.train_set, [self.batch_indices(micro_step)], size) as host:
            return next(host)

    def run(self) -> TrainResult:
        """Trains to the planned step (or ``stop_at_step``), evaluating and checkpointing on the
        way; at the planned end, evaluates and exports.

        Images are decoded on the feed's threads while the device trains, and the loop reads
        metrics back every ``METRICS_EVERY`` steps (and before every save and evaluation, so
        a non-finite loss is caught before anything is written), never blocking on each step.
        """
        started = time.perf_counter()
        config = self.config
        manager = _checkpoint_manager(self.checkpoint_dir, config.keep_checkpoints)
        state = self.start_state(manager)
        accumulation = config.gradient_accumulation_steps
        first_micro_step = int(state.micro_step)
        step = first_micro_step // accumulation
        total = self.plan.total_steps
        finished_before = step == total
        target = min(config.stop_at_step, total) if config.stop_at_step > 0 else total
        evaluations = []
        window = _MetricsWindow(accumulation)
        input_wait = 0.0
        size = self.placement.padded_size(config.batch_size)
        micro_steps = range(first_micro_step, target * accumulation)
        progress = tqdm(total=total, initial=step, desc="training",
                        disable=not config.progress, dynamic_ncols=True)
        with progress, train_data.batches(self.train_set, map(self.batch_indices, micro_steps),
                                          size) as host_batches:
            for micro_step in micro_steps:
                waited = time.perf_counter()
                batch = self.placement.put_batch(next(host_batches))
                input_wait += time.perf_counter() - waited
                state, step_metrics = self.train_step_fn(state, batch)
                window.add(micro_step, step_metrics)
                if (micro_step + 1) % accumulation:
                    continue
                step += 1
                progress.update(1)
                save = step % config.save_every == 0 or step == target
                evaluate = (self.validation_set and config.eval_every
                            and step % config.eval_every == 0 and step < total)
                if save or evaluate or step % METRICS_EVERY == 0:
                    self._check(window, manager)
                    progress.set_postfix(loss=f"{window.mean_loss:.4f}",
                                         lr=f"{float(self.schedule(step - 1)):.2e}")
                if save:
                    _save(manager, step, state, self.plan)
                if evaluate:
                    evaluations.append(self.evaluate(state.params, step, window.mean_loss))
        self._check(window, manager)
        if manager.latest_step() != step:
            _save(manager, step, state, self.plan)
        manager.close()
        export_dir = None
        if step == total:
            # Run again once finished, it evaluates only if stopped before its final
            # evaluation was logged; the export is written again (one stopped midway is not
            # whole).
            if self.validation_set and not (finished_before and self._evaluated(step)):
                # The summary words the final evaluation: not logged as well.
                evaluations.append(self.evaluate(state.params, step, window.mean_loss,
                                                 announce=False))
            export_dir = self.export(state.params)
        seconds = time.perf_counter() - started
        return TrainResult(
            step=step, steps_run=step - first_micro_step // accumulation,
            train_loss=window.mean_loss, evaluations=evaluations,
            export_dir=export_dir, checkpoint_dir=self.checkpoint_dir,
            skipped_images={"train": self.train_set.skipped_images,
                            "validation": self.validation_set.skipped_images
                            if self.validation_set else 0},
            seconds=seconds, images=len(micro_steps) * config.batch_size,
            input_wait_seconds=input_wait)

    def _check(self, window: _MetricsWindow, manager: ocp.CheckpointManager) -> None:
        """Reads the window's metrics back; raises at the first non-finite micro-step."""
        bad = window.fetch()
        if bad is not None:
            micro_step, loss = bad
            raise NonFiniteLossError(
                self._divergence_message(manager, micro_step // window.accumulation, loss),
                fix=("lower_learning_rate",))

    def _divergence_message(self, manager: ocp.CheckpointManager, step: int, loss: float) -> str:
        last_good = manager.latest_step()
        kept = (f"the last good checkpoint (step {last_good}) in {manager.directory} is intact"
                if last_good is not None else "no checkpoint had been saved yet")
        return (f"{self.config.train_file}: training diverged at step {step + 1} (loss {loss}, "
                f"or a gradient or parameter, is not finite); stopped without saving; {kept}")

    def evaluate(self, params: Any, step: int, train_loss: float | None, *,
                 announce: bool = True) -> EvalResult:
        """Validation loss, beam-search captions and their scores; written to ``evals/``
        and, when ``announce``, logged. ``train_loss``: None when no step ran here."""
        dataset = self.validation_set
        size = self.placement.padded_size(self.config.eval_batch_size)
        index_batches = [_pad_indices(np.arange(start, min(start + size, len(dataset))), size)
                         for start in range(0, len(dataset), size)]
        loss_sum, count = 0.0, 0.0
        with train_data.batches(dataset, index_batches, size) as host_batches:
            for batch in host_batches:
                batch_sum, batch_count = self.eval_loss_fn(params, self.placement.put_batch(batch))
                loss_sum, count = loss_sum + float(batch_sum), count + float(batch_count)
        references = train_data.references_by_image(dataset.rows)
        images = list(references)[: self.config.max_eval_images or None]
        predictions = self.caption(params, images, batch_size=size)
        references = {image: references[image] for image in images}
        scores = metrics.caption_scores(predictions, references)
        scores["exact_match"] = metrics.exact_match(predictions, references)
        result = EvalResult(step=step, loss=loss_sum / count, scores=scores,
                            predictions=predictions)
        self._log_eval(result, train_loss, references, announce=announce)
        return result

    def caption(self, params: Any, images: list[str], *, batch_size: int) -> dict[str, str]:
        """Beam-search captions of image paths with ``params``, through the device loop."""
        captions = {}
        items = (InputItem(index, image) for index, image in enumerate(images))

        def readable(batches: Iterator[feed.Batch]) -> Iterator[feed.Batch]:
            for batch in batches:
                if batch.num_decoded < len(batch.items):
                    error = next(error for error in batch.errors if error is not None)
                    raise DataError(f"{self.config.validation_file}: image became unreadable "
                                    f"during training ({error})")
                yield batch

        with feed.batches(items, self.bundle.preprocess_config, batch_size) as batches:
            for batch, output in device_loop.run(readable(batches), self.generator,
                                                 self.caption_settings, params=params):
                texts = self.bundle.tokenizer.batch_decode(
                    output.sequences[:batch.num_decoded], skip_special_tokens=True)
                captions.update({item.name: text.strip()
                                 for item, text in zip(batch.items, texts)})
        return captions

    def _log_eval(self, result: EvalResult, train_loss: float | None,
                  references: dict[str, list[str]], *, announce: bool) -> None:
        # Strict JSON: a number that is not finite (or none) is null, never NaN.
        record = {key: value if value is None or math.isfinite(value) else None
                  for key, value in {"train_loss": train_loss, "eval_loss": result.loss,
                                     **result.scores}.items()}
        if announce:
            logger.info("step %d: %s", result.step, ", ".join(
                f"{key} {value:.4f}" for key, value in record.items() if value is not None))
        evals_dir = self.output_dir / "evals"
        evals_dir.mkdir(parents=True, exist_ok=True)
        with (evals_dir / "log.jsonl").open("a") as log:
            log.write(json.dumps({"step": result.step, **record}, allow_nan=False) + "\n")
        with (evals_dir / f"step_{result.step:07d}.jsonl").open("w") as captions:
            for image, prediction in result.predictions.items():
                captions.write(json.dumps({"image": image, "prediction": prediction,
                                           "references": references[image]}) + "\n")

    def _evaluated(self, step: int) -> bool:
        """Whether ``evals/log.jsonl`` holds an evaluation of ``step``."""
        log = self.output_dir / "evals" / "log.jsonl"
        if not log.is_file():
            return False
        with log.open() as lines:
            return any(_logged_step(line) == step for line in lines)

    def export(self, params: Any) -> Path:
        """Writes a Hugging Face directory with Flax weights, and PyTorch weights when PyTorch
        is installed."""
        destination = Path(self.config.export_dir or self.output_dir / "export")
        loading.save_checkpoint(jax.device_get(params), self.bundle.config, self.bundle.tokenizer,
                                self.bundle.preprocess_config, destination,
                                generation_config=self.bundle.generation_config,
                                flax=True, pytorch=self.export_pytorch)
        logger.info("exported %s", destination)
        return destination


def _logged_step(line: str) -> int | None:
    """The step of an ``evals/log.jsonl`` line; None for a line cut short by a kill."""
    try:
        return json.loads(line).get("step")
    except ValueError:
        return None


def train(config: TrainConfig) -> TrainResult:
    """Runs (or resumes) a training run described by ``config``; see ``Trainer``.

    Raises:
      DataError: unusable data file (missing caption column, empty), named.
      ModelLoadError: the model to start from does not load.
      NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
    """
    return Trainer(config).run()
