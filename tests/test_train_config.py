"""TrainConfig: every field validated up front, one line naming the field; no JAX imported."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from flax_captioner import train
from flax_captioner.errors import DataError, OutputError
from flax_captioner.train_config import TrainConfig

VALID = TrainConfig(train_file="rows.jsonl", model="some/model")

# field -> values validate() must reject (each alone, the rest VALID).
REJECTED = {
    "train_file": [""],
    "output_dir": [""],
    "image_column": [""],
    "caption_column": [""],
    "max_target_length": [1, 0],
    "batch_size": [0, -1, 2.0, True],
    "gradient_accumulation_steps": [0],
    "num_epochs": [-1.0, float("nan"), float("inf"), "3"],
    "max_steps": [-1],
    "learning_rate": [0.0, -1.0, float("inf")],
    "warmup_steps": [-1],
    "weight_decay": [-0.1],
    "adam_beta1": [1.0, -0.1],
    "adam_beta2": [1.0, 1.5],
    "adam_epsilon": [0.0],
    "max_grad_norm": [-1.0],
    "label_smoothing": [1.0, -0.1],
    "seed": [-1],
    "save_every": [0],
    "keep_checkpoints": [0],
    "eval_every": [-1],
    "eval_batch_size": [0],
    "max_eval_images": [-1],
    "num_beams": [0],
    "max_length": [1],
    "stop_at_step": [-1],
    "progress": [1, "yes"],
    "model": [3],
}


def test_defaults_with_data_and_model_are_valid():
    VALID.validate()
    dataclasses.replace(VALID, model="", encoder="vit", decoder="gpt2").validate()
    dataclasses.replace(VALID, num_epochs=0.0, max_steps=10).validate()
    dataclasses.replace(VALID, learning_rate=1, num_epochs=2).validate()  # ints for floats


def test_every_field_has_a_rejected_value_or_is_free_text():
    free_text = {"validation_file", "encoder", "decoder", "image_root", "export_dir"}
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    assert set(REJECTED) | free_text == names


@pytest.mark.parametrize("name,value", [(name, value) for name, values in REJECTED.items()
                                        for value in values])
def test_bad_value_is_one_line_naming_the_field(name, value):
    with pytest.raises(ValueError) as raised:
        dataclasses.replace(VALID, **{name: value}).validate()
    message = str(raised.value)
    assert message.startswith(f"{name} ") and "\n" not in message


def test_epochs_zero_needs_max_steps():
    with pytest.raises(ValueError, match=r"^num_epochs must be > 0 when max_steps is 0"):
        dataclasses.replace(VALID, num_epochs=0.0).validate()


@pytest.mark.parametrize("changes,message", [
    ({"encoder": "vit", "decoder": "gpt2"}, "model excludes encoder and decoder"),
    ({"encoder": "vit"}, "model excludes encoder and decoder"),
    ({"model": "", "encoder": "vit"}, "model is not set, nor are both encoder and decoder"),
    ({"model": ""}, "model is not set, nor are both encoder and decoder"),
])
def test_model_or_encoder_and_decoder(changes, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        dataclasses.replace(VALID, **changes).validate()


def test_check_paths(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("")
    config = dataclasses.replace(VALID, train_file=str(rows), output_dir=str(tmp_path / "run"))
    config.check_paths()
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file \(validation_file\)"):
        dataclasses.replace(config, validation_file=str(tmp_path / "missing.jsonl")).check_paths()
    with pytest.raises(DataError, match=r"no such folder \(image_root\)"):
        dataclasses.replace(config, image_root=str(tmp_path / "images")).check_paths()
    with pytest.raises(OutputError, match=r"rows\.jsonl: exists and is not a folder "
                                          r"\(export_dir\)"):
        dataclasses.replace(config, export_dir=str(rows)).check_paths()


def test_train_module_keeps_the_name_and_trainer_validates_first():
    assert train.TrainConfig is TrainConfig
    # The model name is bogus: the bad batch size must be reported before anything loads.
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0"):
        train.Trainer(dataclasses.replace(VALID, batch_size=0))


def test_importing_it_imports_no_jax():
    result = subprocess.run(
        [sys.executable, "-c", "import sys, flax_captioner.train_config; "
         "print(sorted({'jax', 'flax', 'optax', 'transformers'} & set(sys.modules)))"],
        capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
