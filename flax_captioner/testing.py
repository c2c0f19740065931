"""What the tests and benchmarks share: seeded random checkpoints, the synthetic "shapes"
images, and local object stores.

Checkpoints: each builder makes a PyTorch ``VisionEncoderDecoderModel`` (so it needs PyTorch,
imported inside the builder), draws its random weights from numpy's generator with a fixed
seed, and writes a complete Hugging Face directory: ``config.json``, ``model.safetensors`` (or
``pytorch_model.bin``), a word-level tokenizer whose vocabulary matches the model's, and a
``preprocessor_config.json``. Nothing touches the network.

Shapes: each 64x64 image holds one to three shapes (circle, square, triangle; 16 to 32 pixels,
on an 8-pixel grid) in one of four colours, in a row (captioned "left of") or a column
(captioned "above"), on a dark background with noise: "a blue square left of a yellow
triangle". The caption is a function of the image, so a captioner reaches exact-caption
accuracy only by looking; the output is deterministic for a seed (``render_example``,
``make_dataset``, ``write_shapes_jpegs``; ``python -m scripts.make_shapes_dataset`` writes a
dataset).

Object stores: a real S3-protocol server (moto's server mode, ``moto_s3``) and a GCS emulator
(gcp-storage-emulator, ``gcs_emulator``) on 127.0.0.1, reached through s3fs and gcsfs exactly
as a user's bucket would be (no client mocks); they need the test extras. ``TcpProxy`` stands
between a client and such a server and can be taken down and brought back: an outage.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict
from PIL import Image, ImageDraw

EOS_TOKEN = "<|endoftext|>"
# The chaotic checkpoints (``make_chaotic_checkpoint``): a large decoder init makes a chaotic
# next-token distribution, and with these seeds captions end at many different steps
# (tests/test_parity_generate.py checks it); the parity tests and benchmarks use them.
CHAOTIC_SEEDS = (9, 16, 37)
CHAOTIC_VOCAB = 32
CHAOTIC_INITIALIZER_RANGE = 0.5


def write_word_tokenizer(directory: Path, vocab_size: int) -> int:
    """Writes a word-level fast tokenizer with ``vocab_size`` entries; returns the EOS id.

    Words are ``w0 .. w{n-2}`` and the last id is ``<|endoftext|>`` (as in GPT-2), which is
    bos, eos and pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    eos_id = vocab_size - 1
    vocab[EOS_TOKEN] = eos_id
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    tokenizer.save_pretrained(directory)
    return eos_id


# nlpconnect/vit-gpt2-image-captioning's preprocessor_config.json, verbatim.
NLPCONNECT_PREPROCESSOR = {
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "size": 224,
}


def write_preprocessor_config(directory: Path, image_size: int) -> None:
    """Writes the nlpconnect preprocessor config, resized to ``image_size``."""
    config = {**NLPCONNECT_PREPROCESSOR, "size": image_size}
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def random_pytorch_state(config: Any, seed: int) -> dict[str, np.ndarray]:
    """Random weights for ``config`` as a PyTorch state dict (file names and layouts),
    numpy draws from ``seed``.

    The same seed gives the same checkpoint under every torch and transformers release:
    torch's own ``trunc_normal_`` (the ViT's initializer) draws different values for one seed
    in different releases, and transformers 5 renamed the ViT's parameters in memory, which
    reorders them. So the draws follow the sorted file names, which stay. Each tensor keeps
    Hugging Face's initializer's scale: ``initializer_range`` of its half of the model,
    divided by sqrt(2 x layers) for GPT-2's ``c_proj`` weights; biases are zeros and layer
    norm scales ones, as initialized.
    """
    from flax_captioner import loading, modules

    shapes = {}
    for key, leaf in flatten_dict(modules.param_shapes(config)).items():
        name, axes = loading.pytorch_layout(key, len(leaf.shape))
        shape = tuple(leaf.shape[axis] for axis in axes) if axes else tuple(leaf.shape)
        shapes[name] = (shape, key[-1])
    rng = np.random.default_rng(seed)
    encoder, decoder = config.encoder, config.decoder
    state = {}
    for name, (shape, kind) in sorted(shapes.items()):
        if kind in ("bias", "scale"):
            state[name] = np.full(shape, 1.0 if kind == "scale" else 0.0, np.float32)
            continue
        if name.startswith("encoder."):
            std = encoder.initializer_range
        elif name.endswith("c_proj.weight"):
            std = decoder.initializer_range / np.sqrt(2 * decoder.n_layer)
        else:
            std = decoder.initializer_range
        state[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return state


def make_checkpoint(
    directory: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    encoder_layers: int = 2,
    decoder_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 64,
    n_positions: int = 64,
    initializer_range: float = 0.02,
    weights: str = "safetensors",
    encoder_overrides: dict[str, Any] | None = None,
    decoder_overrides: dict[str, Any] | None = None,
) -> Path:
    """Builds a seeded random ViT-GPT2 ``VisionEncoderDecoderModel`` and saves it.

    ``initializer_range`` applies to the decoder (large values make a chaotic next-token
    distribution, so EOS lands at varied steps). ``weights`` is ``"safetensors"`` or
    ``"bin"`` (a PyTorch pickle, as the nlpconnect checkpoint ships).
    """
    import torch
    from transformers import (GPT2Config, ViTConfig, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    eos_id = vocab_size - 1
    encoder = ViTConfig(
        hidden_size=hidden_size, num_hidden_layers=encoder_layers,
        num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
        image_size=image_size, patch_size=patch_size, **(encoder_overrides or {}))
    decoder = GPT2Config(
        n_embd=hidden_size, n_layer=decoder_layers, n_head=num_heads, vocab_size=vocab_size,
        n_positions=n_positions, add_cross_attention=True, bos_token_id=eos_id,
        eos_token_id=eos_id, initializer_range=initializer_range,
        **(decoder_overrides or {}))
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = eos_id
    config.pad_token_id = eos_id
    config.eos_token_id = eos_id
    state = random_pytorch_state(config, seed)
    if weights == "safetensors":
        model = VisionEncoderDecoderModel.from_pretrained(
            None, config=config, state_dict={name: torch.from_numpy(value)
                                             for name, value in state.items()})
        model.save_pretrained(directory)
    else:  # a pickle, as the nlpconnect checkpoint ships it (tied LM head included);
        # transformers 5 writes safetensors whatever it is asked
        config.save_pretrained(directory)
        state["decoder.lm_head.weight"] = state["decoder.transformer.wte.weight"]
        torch.save({name: torch.from_numpy(value) for name, value in state.items()},
                   directory / "pytorch_model.bin")
    # generation_config.json would carry PyTorch-only defaults; the nlpconnect repo has none.
    (directory / "generation_config.json").unlink(missing_ok=True)
    write_word_tokenizer(directory, vocab_size)
    write_preprocessor_config(directory, image_size)
    return directory


def make_chaotic_checkpoint(directory: str | Path, seed: int) -> Path:
    """A tiny checkpoint (32x32 images, vocabulary 32) whose captions end at varied steps."""
    return make_checkpoint(directory, seed=seed, vocab_size=CHAOTIC_VOCAB,
                           initializer_range=CHAOTIC_INITIALIZER_RANGE)


def chaotic_pixels(seed: int, count: int, image_size: int = 32) -> np.ndarray:
    """float32[count, 3, S, S], standard normal draws from ``seed``: the chaotic checkpoints'
    inputs (drawn with the checkpoint's own seed)."""
    pixels = np.random.default_rng(seed).standard_normal((count, 3, image_size, image_size))
    return pixels.astype(np.float32)


def make_full_size_checkpoint(directory: str | Path, *, seed: int = 0) -> Path:
    """The nlpconnect architecture (ViT-B/16 224, GPT-2 12x768, vocab 50257), random weights."""
    return make_checkpoint(
        directory, seed=seed, image_size=224, patch_size=16, hidden_size=768,
        encoder_layers=12, decoder_layers=12, num_heads=12, vocab_size=50257,
        n_positions=1024, decoder_overrides={"n_inner": None})


# --- the shapes images ----------------------------------------------------------------------

IMAGE_SIZE = 64
# Shapes sit on this grid (the shipped model's ViT patch size): a shape then covers whole
# patches, so the tiny encoder learns shapes from few examples.
GRID = 8
# Drawn at 4x and downsampled, so edges are anti-aliased the same way on every machine.
SUPERSAMPLE = 4
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"row": "left of", "column": "above"}
# Shape sizes (pixels, whole grid cells) allowed for 1, 2 and 3 shapes in an image.
SIZES = {1: (16, 24, 32), 2: (16, 24), 3: (16,)}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float],
               size: float, colour: tuple[int, int, int]) -> None:
    """Draws one filled shape of width ``size`` centred at ``centre`` (supersampled pixels)."""
    x, y = centre
    half = size / 2
    if shape == "circle":
        draw.ellipse((x - half, y - half, x + half, y + half), fill=colour)
    elif shape == "square":
        draw.rectangle((x - half, y - half, x + half, y + half), fill=colour)
    else:  # triangle, apex up
        draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=colour)


def render_example(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Draws one random image and returns it with its caption."""
    count = int(rng.integers(1, 4))
    layout = "row" if rng.random() < 0.5 else "column"
    shapes = [str(rng.choice(SHAPES)) for _ in range(count)]
    colours = [str(rng.choice(list(COLOURS))) for _ in range(count)]
    size = int(rng.choice(SIZES[count]))

    # Free grid cells along the layout axis, spread at random over the gaps before, between
    # (at least one cell, so shapes never touch) and after the shapes.
    cells = IMAGE_SIZE // GRID
    free = cells - count * size // GRID - (count - 1)
    gaps = np.bincount(rng.integers(0, count + 1, size=free), minlength=count + 1)
    along = []
    cursor = int(gaps[0])
    for index in range(count):
        along.append(cursor * GRID)
        cursor += size // GRID + 1 + int(gaps[index + 1])
    across = int(rng.integers(0, cells - size // GRID + 1)) * GRID

    scale = SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(0, 70, size=3))
    image = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), background)
    draw = ImageDraw.Draw(image)
    for start, shape, colour_name in zip(along, shapes, colours):
        left, top = (start, across) if layout == "row" else (across, start)
        centre = ((left + size / 2) * scale, (top + size / 2) * scale)
        jitter = rng.integers(-20, 21, size=3)
        colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour_name], jitter))
        # One pixel of margin inside the cells keeps neighbouring shapes apart.
        draw_shape(draw, shape, centre, (size - 2) * scale, colour)

    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    noise = rng.normal(0.0, 6.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8)
    phrases = [f"a {colour} {shape}" for colour, shape in zip(colours, shapes)]
    caption = f" {RELATIONS[layout]} ".join(phrases)
    return Image.fromarray(pixels), caption


def write_split(out_dir: Path, split: str, count: int, rng: np.random.Generator) -> Path:
    """Renders ``count`` examples into ``out_dir/images`` and writes ``out_dir/<split>.jsonl``."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{split}.jsonl"
    with jsonl.open("w") as rows:
        for index in range(count):
            image, caption = render_example(rng)
            relative = f"images/{split}_{index:05d}.png"
            image.save(out_dir / relative)
            rows.write(json.dumps({"image": relative, "caption": caption}) + "\n")
    return jsonl


def make_dataset(out_dir: str | Path, *, train: int, validation: int, seed: int) -> dict[str, Path]:
    """Writes the train and validation splits; returns their JSONL paths by split name.

    Each split draws from its own stream (seeded by ``seed`` and the split), so changing one
    split's size leaves the other's images unchanged.
    """
    out_dir = Path(out_dir)
    paths = {}
    for stream, (split, count) in enumerate((("train", train), ("validation", validation))):
        if count:
            paths[split] = write_split(out_dir, split, count, np.random.default_rng([seed, stream]))
    return paths


def write_shapes_jpegs(directory: str | Path, count: int, *, seed: int = 0,
                       side: int = IMAGE_SIZE, quality: int = 95) -> tuple[list[Path], list[str]]:
    """``count`` shapes images as JPEG files ``directory/shapes_NNNNN.jpg``, drawn at 64x64
    and enlarged to ``side`` x ``side`` (bicubic) where larger; returns (paths, captions).
    The photo-like encoding the pipeline benchmarks and object-store tests read."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, captions = [], []
    for index in range(count):
        image, caption = render_example(rng)
        if side != IMAGE_SIZE:
            image = image.resize((side, side), Image.Resampling.BICUBIC)
        paths.append(directory / f"shapes_{index:05d}.jpg")
        image.save(paths[-1], quality=quality)
        captions.append(caption)
    return paths, captions


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar shard (WebDataset's layout) holding ``members`` (name, bytes) in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


# --- local object stores --------------------------------------------------------------------

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
_SERVE = ("import sys, time\n"
          "from moto.server import ThreadedMotoServer\n"
          "ThreadedMotoServer('127.0.0.1', int(sys.argv[1]), verbose=False).start()\n"
          "while True: time.sleep(3600)\n")


@contextlib.contextmanager
def moto_s3(*, own_process: bool = False) -> Iterator[str]:
    """Starts the server on a free port; yields its endpoint URL. The AWS credential
    variables are set (to moto's dummy values) while it runs, as a user's would be.

    own_process: serve from a child process, so the server's Python work does not compete
      for this process's GIL (a benchmark then measures the client, as against a real store).
    """
    previous = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        with (_child_server() if own_process else _threaded_server()) as endpoint:
            yield endpoint
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _threaded_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def _child_server() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).read()
                break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        child.kill()
        child.wait()


def enforce_credentials(endpoint: str, enforce: bool) -> None:
    """Makes the server check access keys (unknown keys are refused) or accept any."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth",
                                     data=b"0" if enforce else b"inf", method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).read()


@contextlib.contextmanager
def gcs_emulator(bucket: str) -> Iterator[dict[str, str]]:
    """Serves an empty in-memory store holding ``bucket`` on a free port; yields the gcsfs
    options that reach it (``storage_options``; as environment variables, ``fsspec_env``)."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "test"}
    finally:
        server.stop()


def fsspec_env(options: dict[str, str]) -> dict[str, str]:
    """``options`` as fsspec's configuration variables, which reach every gcsfs instance a
    process makes (how a multi-host job configures its workers)."""
    return {f"FSSPEC_GCS_{name.upper()}": value for name, value in options.items()}


class TcpProxy:
    """Forwards connections to 127.0.0.1:``port`` to the server at ``endpoint``
    (``http://host:port``); ``url`` is the proxy's endpoint, for a client's ``endpoint_url``.

    ``down()`` is an outage as a client sees it: the port stops listening (new connections are
    refused) and the open connections are cut. ``up()`` listens on the same port again.
    """

    def __init__(self, endpoint: str):
        parsed = urllib.parse.urlsplit(endpoint)
        self.target = (parsed.hostname, parsed.port)
        self.port = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.down()

    def up(self) -> None:
        """Listens (again) on ``port``; does nothing while up."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            # Connections cut by down() may linger in TIME_WAIT on this port: rebind anyway.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self.port = listener.getsockname()[1]
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="tcp-proxy",
                         daemon=True).start()

    def down(self) -> None:
        """Stops listening and cuts every open connection; does nothing while down."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._open = self._open, set()
        if listener is not None:
            _cut(listener)
        for connection in connections:
            _cut(connection)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # down(): the listener was shut
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                _cut(client)
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    _cut(client)
                    _cut(server)
                    continue
                self._open.update((client, server))
            threading.Thread(target=self._forward, args=(client, server), name="tcp-proxy",
                             daemon=True).start()

    def _forward(self, client: socket.socket, server: socket.socket) -> None:
        upstream = threading.Thread(target=_pump, args=(client, server), daemon=True)
        upstream.start()
        _pump(server, client)
        upstream.join()
        with self._lock:
            self._open.difference_update((client, server))
        client.close()
        server.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copies ``source`` to ``sink`` until either ends or is cut."""
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _cut(connection: socket.socket) -> None:
    """Closes ``connection`` at once; shut first, so threads blocked on it wake up."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected (any more)
        pass
    connection.close()
