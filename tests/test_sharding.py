"""Data parallelism: mesh and pmap over 4 and 8 virtual CPU devices equal one device, bit for bit.

The device count of a JAX process is fixed at start-up, so each count runs in a fresh
``python -c`` subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=N) that writes
its outputs to an .npz; the test compares them with a one-device subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from flax_captioner.sharding import pad_to_multiple, process_slice

RAGGED_BATCHES = (5, 7, 13)

# A jittable batch function with the generator's shape contract: (params, pixel_values
# [B, 3, H, W], row_keys [B, 2] uint32) -> ([B * R, T] int32, [B * R] f32). Pixels are multiples
# of 1/4 and weights small integers, so every sum is exact in float32 whatever order XLA picks
# for a per-device batch shape: the comparison tests placement, not rounding.
SMALL_FN_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax_captioner.sharding import data_parallel, pad_to_multiple

    import logging

    class Compiles(logging.Handler):  # names of the programs XLA compiles
        def __init__(self):
            super().__init__()
            self.names = []

        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Finished XLA compilation of "):
                self.names.append(message.split(" in ")[0].rsplit(" ", 1)[-1])

    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").addHandler(handler := Compiles())
    logging.getLogger("jax").propagate = False
    compiles = handler.names

    def batch_fn(params, pixel_values, row_keys):
        features = pixel_values.reshape(pixel_values.shape[0], -1) @ params["w"]
        tokens = jnp.argsort(features, axis=-1).astype(jnp.int32) + row_keys[:, :1].astype(jnp.int32)
        scores = features.max(-1) * 0.5 + params["b"]
        return jnp.repeat(tokens, 2, axis=0), jnp.repeat(scores, 2, axis=0)

    rng = np.random.RandomState(0)
    params = {"w": rng.randint(-3, 4, size=(3 * 4 * 4, 6)).astype(np.float32), "b": np.float32(0.5)}
    modes, batches, out = sys.argv[1].split(","), [int(b) for b in sys.argv[2].split(",")], sys.argv[3]
    results = {}
    for mode in modes:
        placement = data_parallel(mode)
        fn, placed = placement.wrap(batch_fn), placement.replicate(params)
        for batch in batches:
            pixels = np.random.RandomState(batch).randint(-4, 5, size=(batch, 3, 4, 4)) / 4
            pixels = pixels.astype(np.float32)
            keys = np.arange(2 * batch, dtype=np.uint32).reshape(batch, 2)
            padded = (pad_to_multiple(pixels, placement.num_shards),
                      pad_to_multiple(keys, placement.num_shards))
            fn.compile(placed, *padded)  # ahead of time: the call must not compile again
            compiled = len(compiles)
            tokens, scores = fn(placed, *padded)
            # pmap's output reshapes compile at the call; they are not the program.
            results[f"{mode}-{batch}-compiles_at_call"] = np.asarray(
                len([name for name in compiles[compiled:] if name != "jit(reshape)"]))
            results[f"{mode}-{batch}-tokens"] = np.asarray(tokens)[: 2 * batch]
            results[f"{mode}-{batch}-scores"] = np.asarray(scores)[: 2 * batch]
        results[f"{mode}-num_shards"] = np.asarray(placement.num_shards)
        try:  # an unpadded ragged batch must be refused, not silently mis-split
            fn(placed, np.zeros((5, 3, 4, 4), np.float32), np.zeros((5, 2), np.uint32))
            results[f"{mode}-refuses_ragged"] = np.asarray(False)
        except ValueError as error:
            results[f"{mode}-refuses_ragged"] = np.asarray("pad_to_multiple" in str(error))
    np.savez(out, **results)
""")


def run_with_devices(script: str, device_count: int, args: list[str]) -> None:
    env = dict(os.environ,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}",
               JAX_PLATFORMS="cpu")
    completed = subprocess.run([sys.executable, "-c", script, *args], env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.fixture(scope="module")
def small_fn_reference(tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("sharding") / "one_device.npz"
    run_with_devices(SMALL_FN_SCRIPT, 1, ["none", ",".join(map(str, RAGGED_BATCHES)), str(out)])
    return dict(np.load(out))


@pytest.mark.parametrize("device_count", [4, 8])
def test_small_fn_mesh_and_pmap_equal_one_device(device_count, small_fn_reference, tmp_path):
    out = tmp_path / "sharded.npz"
    run_with_devices(SMALL_FN_SCRIPT, device_count,
                     ["mesh,pmap,none", ",".join(map(str, RAGGED_BATCHES)), str(out)])
    sharded = dict(np.load(out))
    for mode in ("mesh", "pmap"):
        assert int(sharded[f"{mode}-num_shards"]) == device_count
        assert bool(sharded[f"{mode}-refuses_ragged"])
        for batch in RAGGED_BATCHES:
            for name in ("tokens", "scores"):
                expected = small_fn_reference[f"none-{batch}-{name}"]
                actual = sharded[f"{mode}-{batch}-{name}"]
                assert actual.shape == expected.shape
                np.testing.assert_array_equal(actual, expected, err_msg=f"{mode} {batch} {name}")
    assert int(sharded["none-num_shards"]) == 1
    # Program.compile compiled the very executable each first call then ran.
    assert {mode: [int(sharded[f"{mode}-{batch}-compiles_at_call"]) for batch in RAGGED_BATCHES]
            for mode in ("mesh", "pmap", "none")} == {mode: [0] * len(RAGGED_BATCHES)
                                                       for mode in ("mesh", "pmap", "none")}


def test_pad_to_multiple_repeats_first_row():
    batch = np.arange(10).reshape(5, 2)
    padded = pad_to_multiple(batch, 4)
    assert padded.shape == (8, 2)
    np.testing.assert_array_equal(padded[:5], batch)
    np.testing.assert_array_equal(padded[5:], np.repeat(batch[:1], 3, axis=0))
    assert pad_to_multiple(batch, 5) is batch


def test_process_slices_partition_inputs_in_round_robin():
    items = list(range(11))
    slices = [list(process_slice(items, index, 3)) for index in range(3)]
    assert slices == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    # Streams slice the same way as lists.
    assert list(process_slice(iter(items), 1, 3)) == slices[1]
    with pytest.raises(ValueError):
        process_slice(items, 3, 3)


def test_unknown_mode_is_a_one_line_error():
    from flax_captioner.sharding import data_parallel

    with pytest.raises(ValueError, match="mesh, pmap, none"):
        data_parallel("tpu")


# The real generator on the tiny checkpoint, in one 8-device process: placements over all 8
# devices and over 4 of them, against one device. Every (placement, settings) pair is a
# compilation, so the matrix is kept small: beam search with two returned sequences per image
# everywhere, sampling (per-image keys, sharded with the batch) on mesh and pmap over 8.
GENERATOR_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax_captioner.generator import Generator
    from flax_captioner.loading import load_checkpoint
    from flax_captioner.settings import GenerationSettings
    from flax_captioner.sharding import data_parallel

    checkpoint, out = load_checkpoint(sys.argv[1]), sys.argv[2]
    beam = GenerationSettings.resolve(checkpoint.generation_defaults, num_beams=3,
                                      num_return_sequences=2, max_length=8)
    sample = GenerationSettings.resolve(checkpoint.generation_defaults, do_sample=True,
                                        num_beams=1, top_k=8, max_length=8)
    devices = jax.local_devices()
    placements = {"none": (data_parallel("none"), [beam, sample]),
                  "mesh8": (data_parallel("mesh", devices), [beam, sample]),
                  "pmap8": (data_parallel("pmap", devices), [beam, sample]),
                  "mesh4": (data_parallel("mesh", devices[:4]), [beam]),
                  "pmap4": (data_parallel("pmap", devices[:4]), [beam])}
    results = {}
    for name, (placement, settings_list) in placements.items():
        generator = Generator(checkpoint.params, checkpoint.config, data_parallel=placement)
        for settings in settings_list:
            for batch in (5, 7):
                pixels = np.random.RandomState(batch).uniform(-1, 1, (batch, 3, 32, 32))
                output = generator.generate(pixels.astype(np.float32), settings,
                                            rng=jax.random.key(7))
                kind = "sample" if settings.do_sample else "beam"
                results[f"{name}-{kind}-{batch}-sequences"] = np.asarray(output.sequences)
                results[f"{name}-{kind}-{batch}-scores"] = np.asarray(output.scores)
    np.savez(out, **results)
""")


@pytest.mark.slow
def test_generator_on_4_and_8_devices_equals_one_device(tiny_checkpoint, tmp_path):
    out = tmp_path / "generator.npz"
    run_with_devices(GENERATOR_SCRIPT, 8, [str(tiny_checkpoint), str(out)])
    results = dict(np.load(out))
    compared = 0
    for key, actual in results.items():
        placement, rest = key.split("-", 1)
        if placement == "none":
            continue
        expected = results[f"none-{rest}"]
        if rest.endswith("sequences"):
            np.testing.assert_array_equal(actual, expected, err_msg=key)
        else:
            # Each device runs its share of the batch, and XLA's CPU matmuls round a
            # different row count differently, so scores may move in the last float32 bit.
            np.testing.assert_allclose(actual, expected, rtol=2e-7, atol=0, err_msg=key)
        compared += 1
    assert compared == 2 * (2 * 2 * 2 + 2 * 2)  # sequences + scores of every run
