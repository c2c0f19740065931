"""Loading, conversion and model-level parity with PyTorch (encoder states, decoder logits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import VisionEncoderDecoderModel

from checkpoints import make_checkpoint, make_full_size_checkpoint
from flax_captioner import loading
from flax_captioner.errors import ModelLoadError


def _inputs(image_size: int, seed: int = 0, batch: int = 2, length: int = 7, vocab: int = 64):
    rng = np.random.default_rng(seed)
    pixel_values = rng.uniform(-1, 1, (batch, 3, image_size, image_size)).astype(np.float32)
    decoder_input_ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    return pixel_values, decoder_input_ids


def _assert_model_parity(directory: Path, flax_model, atol: float = 1e-4) -> None:
    """Encoder hidden states and teacher-forced logits: Flax vs PyTorch, same weights."""
    torch_model = VisionEncoderDecoderModel.from_pretrained(directory).eval()
    config = torch_model.config
    pixel_values, decoder_input_ids = _inputs(
        config.encoder.image_size, vocab=config.decoder.vocab_size)
    with torch.no_grad():
        expected = torch_model(pixel_values=torch.from_numpy(pixel_values),
                               decoder_input_ids=torch.from_numpy(decoder_input_ids).long(),
                               output_hidden_states=True)
    actual = flax_model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids)
    np.testing.assert_allclose(np.asarray(actual.encoder_last_hidden_state),
                               expected.encoder_last_hidden_state.numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(np.asarray(actual.logits), expected.logits.numpy(),
                               atol=atol, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_bin_checkpoint"])
def test_local_pytorch_weights_load_and_match_pytorch(fixture, request):
    directory = request.getfixturevalue(fixture)
    loaded = loading.load_checkpoint(directory)
    assert loaded.generation_defaults == loading.GenerationDefaults(
        decoder_start_token_id=63, pad_token_id=63, eos_token_id=63)
    assert loaded.preprocess_config.size == (32, 32)
    assert loaded.tokenizer.eos_token_id == 63
    _assert_model_parity(directory, loaded.model)


@pytest.mark.parametrize("seed,initializer_range", [(3, 0.02), (4, 0.5)])
def test_more_tiny_checkpoints_match_pytorch(tmp_path, seed, initializer_range):
    directory = make_checkpoint(tmp_path / "model", seed=seed, vocab_size=48,
                                initializer_range=initializer_range, decoder_layers=3)
    _assert_model_parity(directory, loading.load_checkpoint(directory).model)


@pytest.mark.slow
def test_full_size_random_model_matches_pytorch(tmp_path):
    directory = make_full_size_checkpoint(tmp_path / "full")
    _assert_model_parity(directory, loading.load_checkpoint(directory).model)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        loading.load_checkpoint(tmp_path / "nowhere")


def test_directory_without_weights(tiny_checkpoint, tmp_path):
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((tiny_checkpoint / name).read_bytes())
    with pytest.raises(ModelLoadError, match="no weights"):
        loading.load_checkpoint(tmp_path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        loading.load_checkpoint(tmp_path)


def test_config_that_is_not_vision_encoder_decoder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="'gpt2' is not a vision-encoder-decoder"):
        loading.load_checkpoint(tmp_path)


def test_bin_weights_without_pytorch(tiny_bin_checkpoint, monkeypatch):
    monkeypatch.setattr(loading, "torch_available", lambda: False)
    with pytest.raises(ModelLoadError, match="need PyTorch"):
        loading.load_checkpoint(tiny_bin_checkpoint)


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flax_captioner.cli", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_hub_unreachable_and_not_cached_is_one_line(tmp_path):
    result = _run_cli("convert", "someone/not-cached-model", str(tmp_path / "out"),
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("flax-captioner: error: someone/not-cached-model: not in the "
                                "local Hugging Face cache")


@pytest.fixture
def offline_hub(monkeypatch):
    """HF_HUB_OFFLINE=1 for one test. huggingface_hub builds its HTTP session for the offline
    state in force at first use and caches it, so the sessions are dropped on the way out."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reset_sessions()
    yield
    monkeypatch.undo()
    reset_sessions()


def test_hub_id_resolves_from_cache_offline(tiny_checkpoint, tmp_path, monkeypatch, offline_hub):
    """A cached hub snapshot loads with HF_HUB_OFFLINE=1 (no network touched)."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--captioner" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in tiny_checkpoint.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (cache / "models--tiny--captioner" / "refs").mkdir()
    (cache / "models--tiny--captioner" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.file_download, "HF_HUB_CACHE", str(cache), raising=False)
    directory = loading.resolve_directory("tiny/captioner")
    assert directory == snapshot


def test_convert_to_flax_loads_without_pytorch(tiny_bin_checkpoint, tmp_path):
    destination = tmp_path / "flax"
    result = _run_cli("convert", str(tiny_bin_checkpoint), str(destination))
    assert result.returncode == 0, result.stderr
    assert (destination / "flax_model.msgpack").is_file()
    assert not (destination / "pytorch_model.bin").exists()
    # A fresh interpreter in which importing torch fails still loads and runs it.
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from flax_captioner.loading import load_checkpoint\n"
        f"m = load_checkpoint({str(destination)!r}).model\n"
        "x = np.zeros((1, 3, 32, 32), np.float32)\n"
        "np.save(sys.argv[1], np.asarray(m(pixel_values=x, decoder_input_ids=np.array([[63, 5]])).logits))\n")
    logits_path = tmp_path / "logits.npy"
    subprocess.run([sys.executable, "-c", script, str(logits_path)], check=True)
    original = loading.load_checkpoint(tiny_bin_checkpoint).model
    expected = original(pixel_values=np.zeros((1, 3, 32, 32), np.float32),
                        decoder_input_ids=np.array([[63, 5]])).logits
    np.testing.assert_array_equal(np.load(logits_path), np.asarray(expected))


def test_convert_to_pytorch_loads_in_pytorch(tiny_checkpoint, tmp_path):
    flax_dir = loading.convert(tiny_checkpoint, tmp_path / "flax")
    torch_dir = loading.convert(flax_dir, tmp_path / "torch", to_pytorch=True)
    assert not (torch_dir / "flax_model.msgpack").exists()
    converted = VisionEncoderDecoderModel.from_pretrained(torch_dir).eval()
    original = VisionEncoderDecoderModel.from_pretrained(tiny_checkpoint).eval()
    pixel_values, decoder_input_ids = _inputs(32)
    with torch.no_grad():
        kwargs = dict(pixel_values=torch.from_numpy(pixel_values),
                      decoder_input_ids=torch.from_numpy(decoder_input_ids).long())
        np.testing.assert_allclose(converted(**kwargs).logits.numpy(),
                                   original(**kwargs).logits.numpy(), atol=1e-6, rtol=0)
    assert loading.load_checkpoint(torch_dir).preprocess_config == \
        loading.load_checkpoint(tiny_checkpoint).preprocess_config


def test_convert_refuses_to_replace_a_checkpoint(tiny_checkpoint, tmp_path):
    destination = loading.convert(tiny_checkpoint, tmp_path / "flax")
    with pytest.raises(ModelLoadError, match="already holds a checkpoint"):
        loading.convert(tiny_checkpoint, destination)
    loading.convert(tiny_checkpoint, destination, overwrite=True)


# The real checkpoints: run only where the hub is reachable.
COCO_CATS = "http://images.cocodataset.org/val2017/000000039769.jpg"


def _hub_or_skip(repo_id: str) -> None:
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, timeout=5)
    except Exception as error:  # any failure means: no hub here
        pytest.skip(f"Hugging Face hub unreachable ({type(error).__name__}); "
                    f"{repo_id} is tested only with network access")


def _coco_cats(tmp_path: Path) -> Path:
    import urllib.request

    path = tmp_path / "000000039769.jpg"
    try:
        urllib.request.urlretrieve(COCO_CATS, path)
    except OSError as error:
        pytest.skip(f"COCO image unreachable ({error})")
    return path


@pytest.mark.network
def test_real_checkpoint_ydshieh_reference_numbers(tmp_path):
    _hub_or_skip("ydshieh/vit-gpt2-coco-en")
    from flax_captioner.captioner import Captioner

    captioner = Captioner.from_pretrained("ydshieh/vit-gpt2-coco-en")
    pixel_values = captioner.preprocess([_coco_cats(tmp_path)])
    start = captioner.generation_defaults.decoder_start_token_id
    logits = captioner.model(pixel_values=pixel_values, decoder_input_ids=np.array([[start]])).logits
    expected = [-38.705837, -30.639936, -31.41905, -39.01204, -38.38698, -34.887215, -33.29087,
                -35.684475, -38.50852, -36.124676]
    np.testing.assert_allclose(np.asarray(logits)[0, 0, :10], expected, atol=1e-4)
    output = captioner.generate(pixel_values, num_beams=4, max_length=16)
    assert captioner.decode(output.sequences) == [
        "a cat laying on top of a couch next to another cat"]
    np.testing.assert_allclose(output.scores, [-0.5956], atol=1e-4)


@pytest.mark.network
def test_real_checkpoint_nlpconnect_matches_pytorch(tmp_path):
    _hub_or_skip(loading.DEFAULT_MODEL)
    from flax_captioner.captioner import Captioner

    captioner = Captioner.from_pretrained()
    image = _coco_cats(tmp_path)
    _assert_model_parity(captioner.checkpoint.directory, captioner.model)
    torch_model = VisionEncoderDecoderModel.from_pretrained(captioner.checkpoint.directory)
    pixel_values = captioner.preprocess([image])
    with torch.no_grad():
        expected = torch_model.generate(torch.from_numpy(pixel_values), num_beams=4, max_length=16)
    assert captioner.caption([image]) == captioner.decode(expected.numpy())
