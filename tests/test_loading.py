"""Loading, conversion and model-level parity with PyTorch (encoder states, decoder logits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import VisionEncoderDecoderModel

from flax_captioner import loading, model, modules
from flax_captioner.errors import ModelLoadError
from flax_captioner.model import ModelSpec
from flax_captioner.testing import make_checkpoint, make_full_size_checkpoint


def _inputs(image_size: int, seed: int = 0, batch: int = 2, length: int = 7, vocab: int = 64):
    rng = np.random.default_rng(seed)
    pixel_values = rng.uniform(-1, 1, (batch, 3, image_size, image_size)).astype(np.float32)
    decoder_input_ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    return pixel_values, decoder_input_ids


def _assert_model_parity(directory: Path, loaded: loading.LoadedCheckpoint,
                         atol: float = 1e-4) -> None:
    """Encoder hidden states and teacher-forced logits: the project's modules vs PyTorch,
    same weights."""
    torch_model = VisionEncoderDecoderModel.from_pretrained(directory).eval()
    config = torch_model.config
    pixel_values, decoder_input_ids = _inputs(
        config.encoder.image_size, vocab=config.decoder.vocab_size)
    with torch.no_grad():
        expected = torch_model(pixel_values=torch.from_numpy(pixel_values),
                               decoder_input_ids=torch.from_numpy(decoder_input_ids).long(),
                               output_hidden_states=True)
    encoder_hidden = model.encode(loaded.params, pixel_values, ModelSpec.from_config(config))
    np.testing.assert_allclose(np.asarray(encoder_hidden),
                               expected.encoder_last_hidden_state.numpy(), atol=atol, rtol=0)
    logits = modules.teacher_forced_logits(loaded.params, loaded.config, pixel_values,
                                           decoder_input_ids)
    np.testing.assert_allclose(np.asarray(logits), expected.logits.numpy(), atol=atol, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_bin_checkpoint"])
def test_local_pytorch_weights_load_and_match_pytorch(fixture, request):
    directory = request.getfixturevalue(fixture)
    loaded = loading.load_checkpoint(directory)
    assert loaded.generation_defaults == loading.GenerationDefaults(
        decoder_start_token_id=63, pad_token_id=63, eos_token_id=63)
    assert loaded.preprocess_config.size == (32, 32)
    assert loaded.tokenizer.eos_token_id == 63
    _assert_model_parity(directory, loaded)


@pytest.mark.parametrize("seed,initializer_range", [(3, 0.02), (4, 0.5)])
def test_more_tiny_checkpoints_match_pytorch(tmp_path, seed, initializer_range):
    directory = make_checkpoint(tmp_path / "model", seed=seed, vocab_size=48,
                                initializer_range=initializer_range, decoder_layers=3)
    _assert_model_parity(directory, loading.load_checkpoint(directory))


@pytest.mark.slow
def test_full_size_random_model_matches_pytorch(tmp_path):
    directory = make_full_size_checkpoint(tmp_path / "full")
    _assert_model_parity(directory, loading.load_checkpoint(directory))


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


def test_bin_weights_load_without_pytorch(tiny_bin_checkpoint, tmp_path):
    """torch.save's zip format is read without PyTorch, to the same weights torch reads."""
    from flax.traverse_util import flatten_dict

    script = ("import sys; sys.modules['torch'] = None\n"
              "import numpy as np\n"
              "from flax.traverse_util import flatten_dict\n"
              "from flax_captioner.loading import load_checkpoint\n"
              "params = flatten_dict(load_checkpoint(sys.argv[1]).params, sep='/')\n"
              "np.savez(sys.argv[2], **params)\n")
    subprocess.run([sys.executable, "-c", script, str(tiny_bin_checkpoint),
                    str(tmp_path / "params.npz")], check=True)
    without_torch = np.load(tmp_path / "params.npz")
    state = torch.load(tiny_bin_checkpoint / "pytorch_model.bin", weights_only=True)
    assert "decoder.lm_head.weight" in state  # the tied head, as the nlpconnect file has it
    expected = flatten_dict(loading.load_checkpoint(tiny_bin_checkpoint).params, sep="/")
    assert set(without_torch.files) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(without_torch[name], value, err_msg=name)
    np.testing.assert_array_equal(
        without_torch["decoder/transformer/h/0/attn/c_attn/kernel"],
        state["decoder.transformer.h.0.attn.c_attn.weight"].numpy().T)


def test_old_format_bin_weights_need_pytorch_and_say_so(tiny_bin_checkpoint, tmp_path,
                                                        monkeypatch):
    directory = _copy_checkpoint(tiny_bin_checkpoint, tmp_path / "model")
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    torch.save(state, directory / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert flatten_params(loading.load_checkpoint(directory)) == flatten_params(
        loading.load_checkpoint(tiny_bin_checkpoint))
    monkeypatch.setattr(loading, "torch_available", lambda: False)
    with pytest.raises(ModelLoadError, match=r"pytorch_model.bin: PyTorch pickle weights of "
                                             r"the format before torch 1.6 need PyTorch"):
        loading.load_checkpoint(directory)


def test_a_pickle_that_holds_more_than_tensors_is_refused(tiny_bin_checkpoint, tmp_path):
    """As torch.load(weights_only=True): a weights file cannot run code."""
    directory = _copy_checkpoint(tiny_bin_checkpoint, tmp_path / "model")
    torch.save({"weights": torch.zeros(2), "hook": os.getcwd},
               directory / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pytorch_model.bin: truncated or corrupt "
                                             r"\(holds posix.getcwd, not only tensors\)"):
        loading.load_checkpoint(directory)


def flatten_params(loaded: loading.LoadedCheckpoint) -> dict:
    from flax.traverse_util import flatten_dict

    return {key: np.asarray(value).tobytes() for key, value in flatten_dict(loaded.params).items()}


def test_weights_are_checked_against_abstract_shapes_not_random_weights(tiny_checkpoint,
                                                                        monkeypatch):
    """The parameter shapes come from tracing the modules' init, never from running it."""
    import jax

    traced = []
    init = modules.VisionEncoderDecoder.init

    def recording(self, rng, *args, **kwargs):
        traced.append(isinstance(rng, jax.core.Tracer))
        return init(self, rng, *args, **kwargs)

    monkeypatch.setattr(modules.VisionEncoderDecoder, "init", recording)
    loaded = loading.load_checkpoint(tiny_checkpoint)
    assert traced == [True]
    leaves = jax.tree_util.tree_leaves(loaded.params)
    assert all(isinstance(leaf, jax.Array) and leaf.dtype == np.float32 for leaf in leaves)
    assert jax.tree_util.tree_structure(loaded.params) == jax.tree_util.tree_structure(
        modules.param_shapes(loaded.config))


def _copy_checkpoint(source: Path, destination: Path, *, skip: tuple[str, ...] = ()) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.name not in skip:
            (destination / file.name).write_bytes(file.read_bytes())
    return destination


def _rewrite_safetensors(directory: Path, edit) -> None:
    """Applies ``edit`` to the PyTorch-format ``model.safetensors`` state dict of ``directory``."""
    from safetensors.numpy import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _stderr_of_fresh_python(script: str, *args: str) -> str:
    """stderr of ``script`` in a new interpreter: transformers' and torch's notices are
    printed once per process, so only a fresh one shows whether they appear at all."""
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


def test_loading_a_pytorch_checkpoint_prints_nothing(tiny_bin_checkpoint):
    """No "TensorFlow and JAX classes are deprecated" notice, no five-line "Some weights ...
    were not used ... lm_head" warning: the checkpoint stores GPT-2's tied LM head."""
    assert "decoder.lm_head.weight" in torch.load(
        tiny_bin_checkpoint / "pytorch_model.bin", weights_only=True)
    stderr = _stderr_of_fresh_python(
        "import sys\nfrom flax_captioner.loading import load_checkpoint\n"
        "load_checkpoint(sys.argv[1])\n", str(tiny_bin_checkpoint))
    assert stderr == ""


def test_tied_lm_head_is_silent_in_process(tiny_bin_checkpoint, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loading.load_checkpoint(tiny_bin_checkpoint)
    assert capfd.readouterr().err == ""


def test_loading_and_captioning_import_no_transformers_flax_code(tiny_checkpoint):
    """transformers 5 has no Flax classes: loading and captioning must not need them."""
    stderr = _stderr_of_fresh_python(
        "import sys\nfrom PIL import Image\nfrom flax_captioner import Captioner\n"
        "captioner = Captioner.from_pretrained(sys.argv[1])\n"
        "captioner.caption([Image.new('RGB', (40, 30))], num_beams=2, max_length=5)\n"
        "flax = sorted(name for name in sys.modules if name.startswith('transformers') and "
        "'flax' in name)\n"
        "print(flax, file=sys.stderr) if flax else None\n", str(tiny_checkpoint))
    assert stderr == ""


def test_exporting_to_pytorch_prints_nothing(tiny_checkpoint):
    """torch.from_numpy on a JAX array's read-only view warns "The given NumPy array is not
    writable"; the export copies each array first."""
    stderr = _stderr_of_fresh_python(
        "import sys\nfrom flax_captioner import loading\n"
        "loaded = loading.load_checkpoint(sys.argv[1])\n"
        "loading.pytorch_model(loaded.config, loaded.params)\n", str(tiny_checkpoint))
    assert stderr == ""


def test_exporting_params_that_do_not_fit_names_the_first_difference(tiny_checkpoint):
    from flax.traverse_util import flatten_dict, unflatten_dict

    loaded = loading.load_checkpoint(tiny_checkpoint)
    flat = flatten_dict(loaded.params)
    del flat["decoder", "transformer", "ln_f", "bias"]
    with pytest.raises(ModelLoadError, match=r"^the weights do not fit the model config "
                                             r"\(decoder/transformer/ln_f/bias is missing; "
                                             r"1 in all\)$"):
        loading.pytorch_model(loaded.config, unflatten_dict(flat))
    flat["decoder", "transformer", "ln_f", "bias"] = np.zeros(5, np.float32)
    with pytest.raises(ModelLoadError, match=r"^the weights do not fit the model config "
                                             r"\(decoder/transformer/ln_f/bias has shape "
                                             r"\(5,\), the config implies \(32,\)\)$"):
        loading.pytorch_model(loaded.config, unflatten_dict(flat))


def test_missing_weight_is_an_error_naming_it(tiny_checkpoint, tmp_path):
    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    _rewrite_safetensors(directory, lambda state: state.pop("decoder.transformer.ln_f.weight"))
    with pytest.raises(ModelLoadError, match=r"model.safetensors: lacks 1 weight the model "
                                             r"needs \(decoder/transformer/ln_f/scale\); "):
        loading.load_checkpoint(directory)


def test_wrong_shape_is_an_error_naming_it(tiny_checkpoint, tmp_path):
    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "model")

    def shrink(state):
        state["decoder.transformer.ln_f.bias"] = state["decoder.transformer.ln_f.bias"][:5]

    _rewrite_safetensors(directory, shrink)
    with pytest.raises(ModelLoadError, match=r"decoder/transformer/ln_f/bias has shape \(5,\), "
                                             r"config.json implies \(32,\)"):
        loading.load_checkpoint(directory)


def test_unused_weight_warns_in_one_line_but_mask_buffers_do_not(tiny_checkpoint, tmp_path):
    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "model")

    def add(state):
        state["decoder.transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.uint8))
        state["decoder.transformer.h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
        state["decoder.classifier.weight"] = np.zeros((2, 32), np.float32)

    _rewrite_safetensors(directory, add)
    with pytest.warns(UserWarning) as record:
        loaded = loading.load_checkpoint(directory)
    messages = [str(warning.message) for warning in record]
    assert messages == [f"{directory / 'model.safetensors'}: holds 1 weight the model does "
                        "not use (decoder/classifier/kernel); ignored"]
    _assert_model_parity(tiny_checkpoint, loaded)


def test_config_the_flax_model_cannot_be_built_from(tiny_checkpoint, tmp_path):
    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    config = json.loads((directory / "config.json").read_text())
    config["decoder"]["cross_attention_hidden_size"] = 48  # the encoder's is 32
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=f"^{directory / 'config.json'}: describes no "
                                             "buildable model .*cross_attention_hidden_size 48"):
        loading.load_checkpoint(directory)


def test_directory_without_tokenizer_files(tiny_checkpoint, tmp_path):
    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "model", skip=("tokenizer.json",))
    with pytest.raises(ModelLoadError) as raised:
        loading.load_checkpoint(directory)
    assert str(raised.value) == (f"{directory}: no tokenizer files (needs tokenizer.json, or "
                                 "vocab.json and merges.txt; vocab.json and merges.txt missing)")


def test_vocab_without_merges(tiny_checkpoint, tmp_path):
    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "model", skip=("tokenizer.json",))
    (directory / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(ModelLoadError, match=r"no tokenizer files .*; merges.txt missing\)$"):
        loading.load_checkpoint(directory)


def test_garbled_tokenizer_file(tiny_checkpoint, tmp_path):
    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelLoadError, match=f"^{directory}: tokenizer files unreadable"):
        loading.load_checkpoint(directory)


def test_tokenizer_without_tokenizer_config_uses_the_decoder_type(tiny_checkpoint, tmp_path):
    """AutoTokenizer alone raises KeyError: VisionEncoderDecoderConfig here. The decoder's
    type (GPT-2) decides, so its byte-level BPE tokenizer.json works as GPT-2's does."""
    from tokenizers import ByteLevelBPETokenizer

    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "model",
                                 skip=("tokenizer_config.json", "special_tokens_map.json"))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a cat on a mat", "two dogs"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save(str(directory / "tokenizer.json"))
    tokenizer = loading.load_checkpoint(directory).tokenizer
    assert tokenizer.eos_token_id == bpe.token_to_id("<|endoftext|>")
    assert tokenizer.decode(tokenizer("a cat on two dogs")["input_ids"]) == "a cat on two dogs"


@pytest.mark.parametrize("content,cause", [
    (None, "not found"),
    ("{not json", "JSON"),
    ('{"size": {"shortest_edge": 32}}', "size"),
])
def test_bad_preprocessor_config(tiny_checkpoint, tmp_path, content, cause):
    directory = _copy_checkpoint(tiny_checkpoint, tmp_path / "model",
                                 skip=("preprocessor_config.json",))
    if content is not None:
        (directory / "preprocessor_config.json").write_text(content)
    with pytest.raises(ModelLoadError) as raised:
        loading.load_checkpoint(directory)
    message = str(raised.value)
    assert message.startswith(f"{directory / 'preprocessor_config.json'}: ") and "\n" not in message
    assert cause in message


@pytest.fixture(scope="module")
def tiny_flax_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    return loading.convert(tiny_checkpoint, tmp_path_factory.mktemp("tiny_flax") / "model")


@pytest.mark.parametrize("fixture,weights", [
    ("tiny_flax_checkpoint", "flax_model.msgpack"),
    ("tiny_checkpoint", "model.safetensors"),
    ("tiny_bin_checkpoint", "pytorch_model.bin"),
])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_file(fixture, weights, damage, request, tmp_path):
    directory = _copy_checkpoint(request.getfixturevalue(fixture), tmp_path / "model")
    path = directory / weights
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not weights " * 20,
                      "empty": b""}[damage])
    with pytest.raises(ModelLoadError) as raised:
        loading.load_checkpoint(directory)
    message = str(raised.value)
    assert message.startswith(f"{path}: truncated or corrupt (") and "\n" not in message


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
    state in force at first use and caches it (0.x), so the sessions are dropped on the way
    out; 1.x reads the setting per request and names the call close_session."""
    from huggingface_hub import constants, utils

    reset_sessions = getattr(utils, "reset_sessions", None) or utils.close_session

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
        "from flax_captioner.modules import teacher_forced_logits\n"
        f"m = load_checkpoint({str(destination)!r})\n"
        "x = np.zeros((1, 3, 32, 32), np.float32)\n"
        "np.save(sys.argv[1], np.asarray(teacher_forced_logits(m.params, m.config, x, "
        "np.array([[63, 5]]))))\n")
    logits_path = tmp_path / "logits.npy"
    subprocess.run([sys.executable, "-c", script, str(logits_path)], check=True)
    original = loading.load_checkpoint(tiny_bin_checkpoint)
    expected = modules.teacher_forced_logits(original.params, original.config,
                                             np.zeros((1, 3, 32, 32), np.float32),
                                             np.array([[63, 5]]))
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
    logits = modules.teacher_forced_logits(captioner.params, captioner.config, pixel_values,
                                           np.array([[start]]))
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
    _assert_model_parity(captioner.checkpoint.directory, captioner.checkpoint)
    torch_model = VisionEncoderDecoderModel.from_pretrained(captioner.checkpoint.directory)
    pixel_values = captioner.preprocess([image])
    with torch.no_grad():
        expected = torch_model.generate(torch.from_numpy(pixel_values), num_beams=4, max_length=16)
    assert captioner.caption([image]) == captioner.decode(expected.numpy())
