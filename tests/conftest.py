"""Shared fixtures: float32 at the highest matmul precision, session-wide tiny checkpoints,
the tiny checkpoint's Captioner, and the environment of the tests' JAX subprocesses."""

from __future__ import annotations

import gc
import os
import pathlib

import jax
import pytest

from flax_captioner.testing import make_checkpoint

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> pathlib.Path:
    """A tiny ViT-GPT2 (32x32 images, 2+2 layers, vocab 64) with safetensors weights."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_bin_checkpoint(tmp_path_factory) -> pathlib.Path:
    """The same architecture as ``tiny_checkpoint`` saved as ``pytorch_model.bin``."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_bin") / "model", seed=1, weights="bin")


@pytest.fixture(scope="module")
def captioner_source(tiny_checkpoint) -> str:
    """What the tiny checkpoint's Captioner loads from (subprocesses load it too)."""
    return str(tiny_checkpoint)


@pytest.fixture(scope="module")
def captioner(captioner_source):
    """The tiny checkpoint's Captioner; test modules with another model define their own."""
    from flax_captioner.captioner import Captioner

    return Captioner.from_pretrained(captioner_source)


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory) -> dict[str, str]:
    """Subprocesses share a persistent compilation cache: only the first one compiles."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Releases each test module's compiled XLA programs when the module ends.

    One pytest process runs the whole suite; keeping every module's executables alive, XLA's
    compiler crashed (SIGSEGV in ``backend_compile_and_load``) inside test_s3.py after ~600
    tests, twice, while the same tests pass in a fresh process.
    """
    yield
    jax.clear_caches()
    gc.collect()

