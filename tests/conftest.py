"""Shared fixtures: float32 at the highest matmul precision, and session-wide tiny checkpoints."""

from __future__ import annotations

import gc
import pathlib

import jax
import pytest

from checkpoints import make_checkpoint

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> pathlib.Path:
    """A tiny ViT-GPT2 (32x32 images, 2+2 layers, vocab 64) with safetensors weights."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_bin_checkpoint(tmp_path_factory) -> pathlib.Path:
    """The same architecture as ``tiny_checkpoint`` saved as ``pytorch_model.bin``."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_bin") / "model", seed=1, weights="bin")


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

