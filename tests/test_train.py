"""The trainer: data, loss, optimizer, steps, resume, divergence, export, data parallelism."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flax_captioner import loading, modules, train_data
from flax_captioner.errors import DataError, NonFiniteLossError
from flax_captioner.preprocess import PreprocessConfig
from flax_captioner.train import (TrainConfig, Trainer, decay_mask, initial_state,
                                  learning_rate_schedule, token_loss, train)

REPO = Path(__file__).resolve().parent.parent
NUM_ROWS = 10


def write_images_dataset(directory: Path, count: int = NUM_ROWS) -> Path:
    """``count`` 32x32 flat-colour PNGs captioned by their colour, as words of the tiny vocab."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        shade = index % 5
        pixels = np.full((32, 32, 3), 40 * shade, np.uint8) + rng.integers(0, 10, (32, 32, 3),
                                                                            dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"img{index}.png")
        rows.append({"image": f"img{index}.png", "caption": f"w{shade + 1} w{shade + 2} w7"})
    path = directory / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> Path:
    return write_images_dataset(tmp_path_factory.mktemp("data"))


def tiny_config(checkpoint: Path, data: Path, output_dir: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        train_file=str(data), validation_file=str(data), output_dir=str(output_dir),
        model=str(checkpoint), max_target_length=6, batch_size=4, max_steps=6,
        learning_rate=1e-2, warmup_steps=2, weight_decay=0.01, label_smoothing=0.1,
        save_every=2, keep_checkpoints=2, eval_batch_size=8, num_beams=2, max_length=6,
        seed=3, progress=False)
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, dataset_file, tmp_path_factory):
    """Six optimizer steps of two micro-batches each (batch 4 of 10 rows: padded batches,
    an epoch boundary), evaluated and exported."""
    config = tiny_config(tiny_checkpoint, dataset_file, tmp_path_factory.mktemp("whole"),
                         gradient_accumulation_steps=2)
    return config, train(config)


def tokenizer_and_preprocess(checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint), PreprocessConfig.from_pretrained(checkpoint)


def test_tokenize_captions_appends_eos_pads_and_shifts(tiny_checkpoint):
    tokenizer, _ = tokenizer_and_preprocess(tiny_checkpoint)
    targets = train_data.tokenize_captions(
        tokenizer, ["w1 w2", "w3 w4 w5 w6 w7 w8"], max_target_length=5,
        decoder_start_token_id=60, pad_token_id=61, eos_token_id=63)
    np.testing.assert_array_equal(targets.labels, [[1, 2, 63, 61, 61], [3, 4, 5, 6, 63]])
    np.testing.assert_array_equal(targets.decoder_input_ids, [[60, 1, 2, 63, 61], [60, 3, 4, 5, 6]])
    np.testing.assert_array_equal(targets.decoder_attention_mask, [[1, 1, 1, 0, 0], [1] * 5])


def test_epoch_order_is_a_function_of_seed_and_epoch_and_pads_the_last_batch():
    first = train_data.epoch_batch_indices(10, 4, seed=1, epoch=0)
    assert first.shape == (3, 4)
    np.testing.assert_array_equal(first, train_data.epoch_batch_indices(10, 4, seed=1, epoch=0))
    assert sorted(first.ravel()[:10]) == list(range(10))
    np.testing.assert_array_equal(first.ravel()[10:], [-1, -1])
    assert not np.array_equal(first, train_data.epoch_batch_indices(10, 4, seed=1, epoch=1))


def test_padding_rows_get_zero_loss_weight(tiny_checkpoint, dataset_file):
    tokenizer, preprocess_config = tokenizer_and_preprocess(tiny_checkpoint)
    dataset = train_data.load_caption_dataset(
        dataset_file, tokenizer, preprocess_config, max_target_length=6,
        decoder_start_token_id=63, pad_token_id=63, eos_token_id=63)
    with train_data.batches(dataset, [np.array([3, -1]), np.array([-1, 0])], 2,
                            num_threads=2) as batches:
        first, second = list(batches)
    assert first["pixel_values"].shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(first["loss_mask"], [[1, 1, 1, 1, 0, 0], [0] * 6])
    # Padding rows repeat row 0's data; each batch is paired with its own indices.
    np.testing.assert_array_equal(second["pixel_values"][0], second["pixel_values"][1])
    np.testing.assert_array_equal(second["labels"][1], dataset.targets.labels[0])
    np.testing.assert_array_equal(second["loss_mask"][0], [0] * 6)


def test_decay_mask_skips_biases_and_layer_norms(tiny_checkpoint):
    params = loading.load_checkpoint(tiny_checkpoint).params
    flat = {"/".join(path): decayed for path, decayed
            in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
            for path in [tuple(str(getattr(key, "key", key)) for key in path)]}
    assert flat["decoder/transformer/h/0/attn/c_attn/kernel"]
    assert flat["encoder/encoder/layer/0/attention/attention/query/kernel"]
    assert not flat["decoder/transformer/h/0/attn/c_attn/bias"]
    assert not flat["decoder/transformer/h/0/ln_1/scale"]
    assert not flat["encoder/encoder/layer/0/layernorm_before/scale"]


def test_schedule_warms_up_linearly_then_decays_to_zero():
    schedule = learning_rate_schedule(TrainConfig(learning_rate=1.0, warmup_steps=4), 12)
    np.testing.assert_allclose([float(schedule(step)) for step in (0, 2, 4, 8, 12)],
                               [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-7)


def test_token_loss_smoothing_scores_a_sure_right_answer_zero_and_masks_padding():
    vocab = 5
    labels = jnp.array([[1, 2, 0]])
    smoothing = 0.1
    # Logits whose softmax equals the smoothed target exactly.
    target = jax.nn.one_hot(labels, vocab) * (0.9 - 0.025) + 0.025
    loss_sum, count = token_loss(jnp.log(target), labels, jnp.array([[1.0, 1.0, 0.0]]), smoothing)
    assert float(count) == 2.0
    assert abs(float(loss_sum)) < 1e-5
    wrong_sum, _ = token_loss(jnp.log(target[:, ::-1]), labels, jnp.ones((1, 3)), smoothing)
    assert float(wrong_sum) > 1.0


def test_one_train_step_lowers_the_loss_on_a_fixed_batch(tiny_checkpoint, dataset_file, tmp_path):
    trainer = Trainer(tiny_config(tiny_checkpoint, dataset_file, tmp_path, warmup_steps=0,
                                  label_smoothing=0.0))
    state = jax.device_put(initial_state(trainer.bundle.params, trainer.optimizer, 0),
                           trainer.placement.replicated)
    batch = trainer.placement.put_batch(trainer.train_batch(0))
    losses = []
    for _ in range(3):
        state, step_metrics = trainer.train_step_fn(state, batch)
        losses.append(float(step_metrics["loss"]))
    assert losses[1] < losses[0] and losses[2] < losses[1]


@pytest.mark.slow
def test_training_evaluates_and_exports(uninterrupted):
    config, result = uninterrupted
    assert result.step == 6
    final = result.evaluations[-1]
    assert set(final.scores) == {"bleu4", "rougeL", "cider", "exact_match"}
    assert len(final.predictions) == NUM_ROWS and np.isfinite(final.loss)
    log = [json.loads(line) for line in (Path(config.output_dir) / "evals/log.jsonl").open()]
    assert log[-1]["step"] == 6 and log[-1]["eval_loss"] == pytest.approx(final.loss)
    kept = sorted(int(p.name) for p in result.checkpoint_dir.iterdir() if p.name.isdigit())
    assert kept == [4, 6]  # keep_checkpoints=2
    for name in ("config.json", "flax_model.msgpack", "model.safetensors",
                 "preprocessor_config.json", "tokenizer.json"):
        assert (result.export_dir / name).is_file(), name


@pytest.mark.slow
def test_stopping_and_resuming_gives_bit_identical_parameters(uninterrupted, tmp_path):
    config, result = uninterrupted
    # Evaluation reads parameters only, so the sliced run skips it.
    sliced = dataclasses.replace(config, output_dir=str(tmp_path), stop_at_step=3,
                                 validation_file="")
    first = train(sliced)
    assert first.step == 3 and first.export_dir is None
    # A new trainer (fresh process state but for the checkpoint directory) resumes.
    second = train(dataclasses.replace(sliced, stop_at_step=0))
    assert second.step == 6 and second.steps_run == 3
    assert ((second.export_dir / "flax_model.msgpack").read_bytes()
            == (result.export_dir / "flax_model.msgpack").read_bytes())
    # A rerun of a finished run trains nothing and says so instead of "train loss nan".
    third = train(dataclasses.replace(sliced, stop_at_step=0))
    assert third.steps_run == 0 and "nan" not in third.summary()
    assert "no training step left to run" in third.summary()


@pytest.mark.slow
def test_exported_checkpoint_logits_match_in_pytorch(uninterrupted):
    import torch
    from transformers import VisionEncoderDecoderModel

    _, result = uninterrupted
    flax_checkpoint = loading.load_checkpoint(result.export_dir)
    assert (result.export_dir / "model.safetensors").is_file()
    torch_model = VisionEncoderDecoderModel.from_pretrained(result.export_dir).eval()
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    decoder_ids = np.array([[63, 1, 2, 3], [63, 4, 5, 6]], np.int32)
    flax_logits = modules.teacher_forced_logits(flax_checkpoint.params, flax_checkpoint.config,
                                                pixels, decoder_ids)
    with torch.no_grad():
        torch_logits = torch_model(pixel_values=torch.from_numpy(pixels),
                                   decoder_input_ids=torch.from_numpy(decoder_ids).long()).logits
    np.testing.assert_allclose(np.asarray(flax_logits), torch_logits.numpy(), atol=1e-4)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(
        tiny_checkpoint, dataset_file, tmp_path):
    config = tiny_config(tiny_checkpoint, dataset_file, tmp_path, learning_rate=1e30,
                         warmup_steps=0, save_every=1, max_grad_norm=0.0, validation_file="")
    with pytest.raises(NonFiniteLossError, match=r"diverged at step \d.*last good checkpoint"):
        train(config)
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and not (tmp_path / "export").exists()
    last_good = Trainer(config)
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager((tmp_path / "checkpoints").absolute()) as manager:
        state = last_good.start_state(manager)
    assert int(state.micro_step) == saved[-1]
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(state.params))


def test_divergence_between_metric_reads_is_caught_before_any_save(
        tiny_checkpoint, dataset_file, tmp_path):
    # Metrics are read every METRICS_EVERY steps and before saves: with saves far apart, the
    # run still stops at the first bad step's window, and nothing non-finite is written.
    config = tiny_config(tiny_checkpoint, dataset_file, tmp_path, learning_rate=1e30,
                         warmup_steps=0, save_every=100, max_steps=12, max_grad_norm=0.0,
                         validation_file="")
    with pytest.raises(NonFiniteLossError, match=r"diverged at step [12] .*no checkpoint had "
                                                 r"been saved yet"):
        train(config)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_training_without_pytorch_exports_flax_weights_and_says_so_first(
        tiny_checkpoint, dataset_file, tmp_path):
    script = textwrap.dedent("""
        import json, sys
        sys.modules["torch"] = None  # as if PyTorch were not installed
        from flax_captioner.train import TrainConfig, train
        print(train(TrainConfig(**json.loads(sys.argv[1]))).summary())
    """)
    output_dir = tmp_path / "run"
    config = tiny_config(tiny_checkpoint, dataset_file, output_dir, max_steps=1,
                         validation_file="")
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(dataclasses.asdict(config))],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PyTorch is not installed: the final export will hold Flax weights only" in done.stderr
    assert (output_dir / "export" / "flax_model.msgpack").is_file()
    assert not (output_dir / "export" / "model.safetensors").exists()
    assert "exported to" in done.stdout


# --- bad data ---------------------------------------------------------------------------------

def test_missing_caption_column_names_the_file(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"image": "a.png", "text": "w1"}) + "\n")
    with pytest.raises(DataError, match=r"rows\.jsonl:1: no caption column 'caption'"):
        train_data.read_caption_rows(jsonl)
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("image,text\na.png,w1\n")
    with pytest.raises(DataError,
                       match=r"rows\.csv: no caption column 'caption' \(columns: image, text\)"):
        train_data.read_caption_rows(csv_file)


def test_empty_dataset_stops_before_training(tmp_path, tiny_checkpoint):
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\n")
    with pytest.raises(DataError, match=r"empty\.csv: the dataset is empty"):
        train(TrainConfig(train_file=str(empty), model=str(tiny_checkpoint),
                          output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_unreadable_images_are_skipped_and_counted(tmp_path, tiny_checkpoint, caplog):
    write_images_dataset(tmp_path, count=3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [{"image": f"img{i}.png", "caption": ["w1 w2", "w3"]} for i in range(3)]
    rows += [{"image": "broken.png", "caption": "w1"}, {"image": "missing.png", "caption": "w2"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer, preprocess_config = tokenizer_and_preprocess(tiny_checkpoint)
    with caplog.at_level("WARNING"):
        dataset = train_data.load_caption_dataset(
            path, tokenizer, preprocess_config, max_target_length=4,
            decoder_start_token_id=63, pad_token_id=63, eos_token_id=63)
    assert dataset.skipped_images == 2 and len(dataset) == 6  # two captions per readable image
    assert "skipped 2 unreadable image(s)" in caplog.text


def test_a_dataset_of_only_unreadable_images_is_an_error(tmp_path, tiny_checkpoint):
    path = tmp_path / "bad.csv"
    path.write_text("image,caption\nmissing.png,w1\n")
    tokenizer, preprocess_config = tokenizer_and_preprocess(tiny_checkpoint)
    with pytest.raises(DataError, match=r"bad\.csv: the dataset is empty \(none of its 1"):
        train_data.load_caption_dataset(
            path, tokenizer, preprocess_config, max_target_length=4,
            decoder_start_token_id=63, pad_token_id=63, eos_token_id=63)


def test_coco_captions_file_with_image_root(tmp_path):
    annotations = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
                   "annotations": [{"image_id": 7, "caption": "A cat. "},
                                   {"image_id": 7, "caption": "Two cats"},
                                   {"image_id": 9, "caption": "A dog"}]}
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps(annotations))
    rows = train_data.read_caption_rows(path, image_root="/data/val2017")
    assert rows == [train_data.CaptionRow("/data/val2017/a.jpg", "A cat."),
                    train_data.CaptionRow("/data/val2017/a.jpg", "Two cats"),
                    train_data.CaptionRow("/data/val2017/b.jpg", "A dog")]
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                     "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(DataError, match=r"instances\.json: annotations have no 'caption'"):
        train_data.read_caption_rows(instances)


# --- processes and devices ------------------------------------------------------------------

STEP_SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax_captioner.sharding import MeshDataParallel
    from flax_captioner.train import Trainer, TrainConfig, initial_state
    config = TrainConfig(train_file=sys.argv[1], model=sys.argv[2], output_dir=sys.argv[3],
                         batch_size=6, max_target_length=6, max_steps=2, learning_rate=1e-3,
                         weight_decay=0.01, progress=False)
    trainer = Trainer(config)
    assert len(jax.devices()) == 4, jax.devices()
    results = {}
    for count in (1, 2, 4):
        trainer.placement = MeshDataParallel(jax.devices()[:count])
        state = jax.device_put(initial_state(trainer.bundle.params, trainer.optimizer, 0),
                               trainer.placement.replicated)
        batch = trainer.placement.put_batch(trainer.train_batch(0))
        state, step_metrics = trainer.train_step_fn(state, batch)
        results[count] = (jax.tree_util.tree_leaves(jax.device_get(state.params)),
                          float(step_metrics["loss"]), float(step_metrics["grad_norm"]))
    for count in (2, 4):
        params, loss, grad_norm = results[count]
        np.testing.assert_allclose(loss, results[1][1], rtol=1e-6)
        np.testing.assert_allclose(grad_norm, results[1][2], rtol=1e-5)
        for single, parallel in zip(results[1][0], params):
            np.testing.assert_allclose(parallel, single, atol=1e-5, rtol=0)
    print("batch rows on 4 devices:", batch["pixel_values"].shape[0])
""")


def run_python(script: str, *args: str, devices: int = 1, **popen) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env,
                            cwd=REPO, **popen)


@pytest.mark.slow
def test_data_parallel_step_on_2_and_4_devices_matches_one_device(
        tiny_checkpoint, dataset_file, tmp_path):
    # 4 virtual CPU devices in a subprocess; meshes of 1, 2 and 4 of them run the same step
    # (dropout on). 6 rows over 4 devices: the batch is padded to 8 with zero-weight rows.
    process = run_python(STEP_SCRIPT, dataset_file, tiny_checkpoint, tmp_path, devices=4,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert "batch rows on 4 devices: 8" in output


KILL_SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    from flax_captioner.train import TrainConfig, train
    train(TrainConfig(**json.loads(sys.argv[1])))
""")


@pytest.mark.slow
def test_a_killed_run_resumes_bit_identically(tiny_checkpoint, dataset_file, tmp_path):
    config = tiny_config(tiny_checkpoint, dataset_file, tmp_path / "whole", max_steps=40,
                         save_every=40, validation_file="")
    whole = train(config)
    killed = dataclasses.replace(config, output_dir=str(tmp_path / "killed"), save_every=1)
    process = run_python(KILL_SCRIPT, json.dumps(dataclasses.asdict(killed)))
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(p.name == "3" for p in checkpoints.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "export").exists()  # killed before the end
    # Resumed from the killed run's newest checkpoint; it saves once, at its end (saving
    # every step is how the killed run left checkpoints to resume from, not what is tested).
    resumed = train(dataclasses.replace(killed, save_every=config.save_every))
    assert ((resumed.export_dir / "flax_model.msgpack").read_bytes()
            == (whole.export_dir / "flax_model.msgpack").read_bytes())
