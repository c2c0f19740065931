"""Backend choices: precision per compute dtype, default batch sizes, the bfloat16 CPU rule,
the out-of-memory error, and a search with no host round trips."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_captioner import backend, loading, sharding
from flax_captioner.errors import FIXES, CaptionerError
from flax_captioner.generator import Generator, build_generate_fn
from flax_captioner.settings import GenerationSettings

EOS = 63  # the conftest tiny checkpoint's vocabulary is 64, EOS last


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return loading.load_checkpoint(tiny_checkpoint)


def settings_for(**overrides) -> GenerationSettings:
    ids = dict(decoder_start_token_id=EOS, pad_token_id=EOS, eos_token_id=EOS)
    return GenerationSettings.resolve(type("Defaults", (), ids), **overrides)


def dot_precisions(jaxpr) -> list:
    """The precision of every dot_general in ``jaxpr``, loop bodies included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += dot_precisions(inner)
    return found


def test_matmul_precision_is_chosen_by_the_compute_dtype():
    assert backend.matmul_precision(jnp.float32) == "highest"
    assert backend.matmul_precision("bfloat16") == "default"
    with pytest.raises(ValueError, match="float32 \\(exact\\) or bfloat16 \\(fast\\), got float16"):
        backend.matmul_precision(jnp.float16)


@pytest.mark.parametrize("dtype, expected", [(jnp.float32, jax.lax.Precision.HIGHEST),
                                             (jnp.bfloat16, jax.lax.Precision.DEFAULT)])
def test_generator_traces_at_its_own_precision_whatever_the_callers_config(
        tiny_model, dtype, expected):
    generator = Generator(tiny_model.params, tiny_model.config, dtype=dtype,
                          data_parallel=sharding.SingleDevice())
    generator.data_parallel.wrap = lambda fn, options: fn  # the traced function, not jitted
    settings = settings_for(num_beams=2, max_length=5)
    pixels = np.zeros((2, 3, 32, 32), np.float32)
    keys = np.zeros((2, 2), np.uint32)
    for callers in ("bfloat16", "tensorfloat32", "highest"):
        with jax.default_matmul_precision(callers):
            program = generator.program(2, settings)
            precisions = dot_precisions(jax.make_jaxpr(program)(generator.params, pixels,
                                                                keys).jaxpr)
        # Encoder, cross K/V, the decode step inside the loop and the lm_head.
        assert len(precisions) > 10
        assert set(precisions) == {(expected, expected)}, callers
    assert len(generator._programs) == 1  # one cache entry, whatever the caller's config


def test_search_runs_without_host_callbacks_or_implicit_transfers(tiny_model):
    settings = settings_for(num_beams=3, max_length=8)
    spec = Generator(tiny_model.params, tiny_model.config).spec
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    keys = np.zeros((4, 2), np.uint32)
    fn = backend.at_precision(build_generate_fn(spec, settings), "highest")
    hlo = jax.jit(fn).lower(tiny_model.params, pixels, keys).compile().as_text()
    assert re.search(r"\bwhile\(", hlo)  # the search loop is inside the program
    assert not re.findall(r"\b(outfeed|infeed|send|recv)\(", hlo)
    targets = re.findall(r'custom_call_target="([^"]+)"', hlo)
    assert not [target for target in targets if "callback" in target], targets

    generator = Generator(tiny_model.params, tiny_model.config)
    program = generator.program(4, settings)
    placed = jax.device_put((pixels, keys))
    with jax.transfer_guard("disallow"):  # any implicit host<->device copy raises
        output = jax.block_until_ready(program(generator.params, *placed))
    np.testing.assert_array_equal(np.asarray(output.sequences),
                                  generator.generate(pixels, settings).sequences)


# Every form of every field that a CPU runs (cuDNN's fused attention needs a GPU), each
# switched alone from the portable defaults.
CPU_FORMS = [(name, form) for name, forms in backend.FORMS.items() for form in forms
             if form != "cudnn" and form != getattr(backend.Kernels(), name)]


@pytest.fixture(scope="module")
def portable_search(tiny_model):
    """(settings, pixels, output) of a beam search with the portable ``Kernels()``."""
    settings = settings_for(num_beams=3, max_length=8)
    pixels = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    generator = Generator(tiny_model.params, tiny_model.config, kernels=backend.Kernels())
    return settings, pixels, generator.generate(pixels, settings)


@pytest.mark.parametrize(("name", "form"), CPU_FORMS, ids=lambda value: str(value))
def test_each_kernel_form_gives_the_same_search(tiny_model, portable_search, name, form):
    settings, pixels, expected = portable_search
    kernels = dataclasses.replace(backend.Kernels(), **{name: form})
    output = Generator(tiny_model.params, tiny_model.config, kernels=kernels).generate(
        pixels, settings)
    np.testing.assert_array_equal(output.sequences, expected.sequences)
    np.testing.assert_allclose(output.scores, expected.scores, rtol=1e-5)


def test_generator_takes_its_platforms_kernels_and_checks_the_ones_it_is_given(tiny_model):
    platform = jax.devices()[0].platform
    for dtype in (jnp.float32, jnp.bfloat16):
        generator = Generator(tiny_model.params, tiny_model.config, dtype=dtype)
        assert generator.kernels == backend.kernels(platform, dtype)
    for name in ("encoder_attention", "cross_context"):
        for dtype in (jnp.float32, jnp.bfloat16):  # cuDNN's fused attention: GPUs, bfloat16
            cudnn = backend.Kernels(**{name: "cudnn"})
            with pytest.raises(ValueError) as error:
                Generator(tiny_model.params, tiny_model.config, dtype=dtype, kernels=cudnn)
            assert str(error.value) == (f"{name} 'cudnn' runs on GPUs in bfloat16, not on "
                                        f"cpu in {jnp.dtype(dtype).name}")
            with pytest.raises(ValueError, match=f"^{name} 'cudnn' runs on GPUs in bfloat16"):
                backend.kernels("tpu", dtype, **{name: "cudnn"})
        backend.kernels("gpu", jnp.bfloat16, **{name: "cudnn"})  # where it runs


def test_an_unknown_form_or_field_is_refused_in_one_line():
    for name in backend.FORMS:
        with pytest.raises(ValueError, match=f"^{name} must be one of .*, got 'forever'$"):
            backend.Kernels(**{name: "forever"})
        with pytest.raises(ValueError, match=f"^{name} must be one of"):
            backend.kernels("cpu", jnp.float32, **{name: "forever"})
    with pytest.raises(ValueError, match="^compiler_options must map XLA option names"):
        backend.Kernels(compiler_options="xla_gpu_enable_triton_gemm")
    with pytest.raises(TypeError, match="flash"):
        backend.kernels("cpu", jnp.float32, flash=True)


def test_every_platforms_kernels_pass_its_rules_and_their_xla_options_parse(tiny_model):
    # The table's choices are ones their platform runs; XLA rejects an option name or value
    # it does not know on any backend, so a CPU compiles with every platform's options.
    settings = settings_for(max_length=4)
    pixels = np.zeros((1, 3, 32, 32), np.float32)
    options = {kernels.compiler_options for kernels in backend.KERNELS.values()} - {()}
    for (platform, dtype), kernels in backend.KERNELS.items():
        assert backend.kernels(platform, dtype) == kernels
    for compiler_options in options:
        generator = Generator(tiny_model.params, tiny_model.config,
                              kernels=backend.Kernels(compiler_options=compiler_options))
        assert generator.generate(pixels, settings).sequences.shape == (1, 4)


@pytest.mark.parametrize("mode", ["none", "mesh"])
def test_fixed_steps_loop_compiles_to_a_trip_count_xla_knows(tiny_model, mode):
    # XLA:GPU's while thunk reads the predicate back to the host each iteration unless the
    # loop carries known_trip_count (annotated by a pass XLA:CPU runs too), and the call that
    # launches the program then holds the host until the search ends.
    settings = settings_for(num_beams=3, max_length=8)
    pixels = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    keys = np.zeros((4, 2), np.uint32)
    trip_counts, sequences = {}, {}
    for loop in ("until_done", "fixed_steps"):
        generator = Generator(tiny_model.params, tiny_model.config,
                              kernels=backend.Kernels(search_loop=loop),
                              data_parallel=sharding.data_parallel(mode))
        hlo = generator.program(4, settings).lower(generator.params, pixels, keys).compile(
        ).as_text()
        loops = [line for line in hlo.splitlines() if re.search(r"\bwhile\(", line)]
        assert len(loops) == 1, loops
        trip_counts[loop] = re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', loops[0])
        sequences[loop] = generator.generate(pixels, settings).sequences
    assert trip_counts == {"until_done": [], "fixed_steps": ["6"]}  # steps 1 .. max_length - 2
    np.testing.assert_array_equal(sequences["fixed_steps"], sequences["until_done"])


@pytest.mark.parametrize("mode", ["none", "mesh"])
def test_searches_compile_with_the_callers_xla_options(tiny_model, mode):
    placement = sharding.data_parallel(mode)
    pixels = np.zeros((2, 3, 32, 32), np.float32)
    # An option XLA does not know fails the compile: the options reach it.
    unknown = Generator(tiny_model.params, tiny_model.config, data_parallel=placement,
                        kernels=backend.Kernels(compiler_options={"no_such_xla_option": 1}))
    with pytest.raises(Exception, match="no_such_xla_option"):
        unknown.generate(pixels, settings_for(max_length=4))


def test_pmap_placement_compiles_with_xla_defaults_and_refuses_options_at_construction(
        tiny_model, monkeypatch):
    # A platform with XLA options (GPUs in float32), here the CPU's: the mesh and
    # single-device placements take them, pmap takes none.
    with_options = backend.Kernels(compiler_options={"xla_gpu_enable_triton_gemm": False})
    monkeypatch.setitem(backend.KERNELS, (jax.devices()[0].platform, "float32"), with_options)
    assert Generator(tiny_model.params, tiny_model.config).kernels == with_options
    pmapped = Generator(tiny_model.params, tiny_model.config,
                        data_parallel=sharding.data_parallel("pmap"))
    assert pmapped.kernels == dataclasses.replace(with_options, compiler_options=())
    with pytest.raises(ValueError, match="^compiler_options need the mesh or single-device "
                                         "placement: jax.pmap takes none$"):
        Generator(tiny_model.params, tiny_model.config,
                  data_parallel=sharding.data_parallel("pmap"),
                  kernels=backend.Kernels(compiler_options={"xla_gpu_autotune_level": 0}))


class FakeDevice:
    def __init__(self, platform: str, bytes_limit: int | None = None):
        self.platform = platform
        self.bytes_limit = bytes_limit

    def memory_stats(self):
        if self.bytes_limit is None:
            raise NotImplementedError("no memory stats")
        return {"bytes_limit": self.bytes_limit, "bytes_in_use": 0}


def test_default_batch_size_per_backend():
    assert backend.default_batch_size(jax.devices("cpu")) == 8
    assert backend.default_batch_size([FakeDevice("cpu")] * 4) == 8
    h100 = FakeDevice("gpu", 80 * 2**30)
    assert backend.default_batch_size([h100]) == 256
    assert backend.default_batch_size([h100] * 8) == 2048  # 256 per device
    # 16 GiB TPU chip: (0.75 x 16 GiB - 0.96 GB of weights) / 36.3 MB = 328 images -> 256.
    assert backend.default_batch_size([FakeDevice("tpu", 16 * 2**30)] * 4) == 1024
    # 8 GiB: 150 images fit -> 128 per device.
    assert backend.default_batch_size([FakeDevice("gpu", 8 * 2**30)] * 2) == 256
    assert backend.default_batch_size([FakeDevice("gpu", 2**29)]) == 1  # nothing fits: 1
    assert backend.default_batch_size([FakeDevice("tpu")]) == 256  # no memory stats
    with pytest.raises(ValueError, match="at least one device"):
        backend.default_batch_size([])


def test_image_memory_estimate_counts_each_term():
    nlpconnect = backend.NLPCONNECT_IMAGE_BYTES
    # Cross K/V alone is 12 layers x 2 x 197 x 768 float32 = 14.5 MB of it.
    assert 12 * 2 * 197 * 768 * 4 < nlpconnect < 40e6
    half = backend.image_memory_bytes(encoder_length=197, hidden_size=768, num_layers=12,
                                      encoder_heads=12, vocab_size=50257, image_size=224,
                                      dtype=jnp.bfloat16)
    # bfloat16 halves cross K/V and the cache, nothing else.
    assert nlpconnect - half == (12 * 2 * 197 * 768 + 2 * 4 * 12 * 2 * 16 * 768) * 2


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4 = "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f amx_bf16 amx_tile\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16\n"


def test_bfloat16_warning_only_on_cpus_known_to_lack_bfloat16_units():
    cpus = [FakeDevice("cpu")]
    message = backend.slow_bfloat16_message(jnp.bfloat16, cpus, AVX2_ONLY)
    assert message and "no bfloat16 units" in message and "\n" not in message
    assert backend.slow_bfloat16_message(jnp.bfloat16, cpus, ZEN4) is None
    assert backend.slow_bfloat16_message(jnp.bfloat16, cpus, SAPPHIRE_RAPIDS) is None
    assert backend.slow_bfloat16_message(jnp.bfloat16, cpus, ARM) is None  # unknown: no warning
    assert backend.slow_bfloat16_message(jnp.float32, cpus, AVX2_ONLY) is None
    assert backend.slow_bfloat16_message(jnp.bfloat16, [FakeDevice("gpu")], AVX2_ONLY) is None
    assert backend.cpu_flags(ZEN4) >= {"avx512_bf16"}
    assert backend.cpu_flags(ARM) is None


def test_bfloat16_warning_is_one_log_line_only_for_bfloat16(monkeypatch, caplog):
    monkeypatch.setattr(backend, "cpu_flags", lambda cpuinfo=None: frozenset({"avx2"}))
    with caplog.at_level("WARNING", logger="flax_captioner"):
        backend.warn_if_slow_bfloat16(jnp.bfloat16, jax.devices("cpu"))
        backend.warn_if_slow_bfloat16(jnp.float32, jax.devices("cpu"))
    (record,) = caplog.records
    assert "bfloat16 measured slower than float32" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_out_of_memory_error_from_a_real_resource_exhausted():
    # 2**48 bytes is past any x86-64 process's address space, so XLA's allocation fails.
    with pytest.raises(RuntimeError) as raised:
        jax.jit(lambda x: jnp.broadcast_to(x, (1 << 46,)) + 1)(jnp.float32(1)).block_until_ready()
    assert backend.is_out_of_memory(raised.value)
    assert not backend.is_out_of_memory(RuntimeError("INTERNAL: something else"))
    assert not backend.is_out_of_memory(ValueError("RESOURCE_EXHAUSTED"))

    error = backend.out_of_memory_error(raised.value, batch=300, bucket=512, num_shards=1,
                                        platform="gpu")
    assert isinstance(error, CaptionerError) and error.fix == ("smaller_batch",)
    assert "smaller_batch" in FIXES
    message = str(error)
    assert "\n" not in message and len(message) < 300
    assert message.startswith("a batch of 300 images (compiled for 512) does not fit in gpu "
                              "memory (RESOURCE_EXHAUSTED: Out of memory allocating")
    assert message.endswith("try a batch of at most 256")
    sharded = backend.out_of_memory_error(raised.value, batch=8, bucket=8, num_shards=8,
                                          platform="tpu")
    assert "even at one image per device" in str(sharded) and sharded.fix == ()


OOM_SCRIPT = textwrap.dedent("""
    import ctypes, json, resource, sys
    import numpy as np
    from flax_captioner.errors import CaptionerError
    from flax_captioner.generator import Generator
    from flax_captioner.loading import load_checkpoint
    from flax_captioner.settings import GenerationSettings

    model = load_checkpoint(sys.argv[1])
    generator = Generator(model.params, model.config)
    ids = dict(decoder_start_token_id=63, pad_token_id=63, eos_token_id=63)
    settings = GenerationSettings.resolve(type("D", (), ids), num_beams=2, max_length=6)
    pixels = np.random.default_rng(0).standard_normal((2048, 3, 32, 32)).astype(np.float32)
    generator.generate(pixels, settings)  # compiles and runs once without a limit
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    status = open("/proc/self/status").read()
    in_use = int(status.split("VmSize:")[1].split()[0]) * 1024
    # 8 MiB more address space: less than the batch's 25 MB of pixels on the device.
    resource.setrlimit(resource.RLIMIT_AS, (in_use + (8 << 20), resource.RLIM_INFINITY))
    try:
        generator.generate(pixels, settings)
        print(json.dumps({"raised": None}))
    except CaptionerError as error:
        print(json.dumps({"raised": str(error), "fix": list(error.fix),
                          "cause": type(error.__cause__).__name__}))
""")


@pytest.mark.slow  # ~15 s: compiles a 2,048-image program in a subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and glibc")
def test_generator_turns_a_real_out_of_memory_into_one_line(tiny_checkpoint):
    # Every allocation of 1 MiB or more gets its own mapping, so the limit catches it.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    completed = subprocess.run([sys.executable, "-c", OOM_SCRIPT, str(tiny_checkpoint)],
                               capture_output=True, text=True, timeout=600, env=env,
                               cwd=Path(__file__).resolve().parent.parent)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["fix"] == ["smaller_batch"]
    assert result["cause"] in ("JaxRuntimeError", "XlaRuntimeError")  # jax >= 0.7 / older
    assert result["raised"].startswith("a batch of 2048 images does not fit in cpu memory "
                                       "(RESOURCE_EXHAUSTED: Out of memory allocating ")
    assert result["raised"].endswith("; try a batch of at most 1024")
