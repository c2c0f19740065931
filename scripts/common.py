"""What the benchmarks share: timing, synthetic inputs, the machine, and the kernel choices.

Imports nothing heavy at module level: the scripts' worker processes import this module
before they decide which framework to load.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHAPES_MODEL = REPO / "examples" / "shapes-captioner"
SAMPLE_IMAGES = REPO / "examples" / "images"

T = TypeVar("T")


# --- timing ---------------------------------------------------------------------------------

def timed(call: Callable[[], T]) -> tuple[T, float]:
    """``call()`` and the wall seconds it took."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def process_cpu_seconds() -> float:
    """CPU seconds this process has used (its threads, not its child processes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def host_cpu_seconds() -> float | None:
    """CPU seconds the whole host has been busy since boot, every process and core together
    (Linux's /proc/stat: user, nice, system, irq, softirq, steal); None where there is no
    /proc/stat. On a machine left to one benchmark, a difference over a run is that run's CPU,
    its worker processes' included."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """``items`` starting at ``turn`` (mod their count): taking turns in a rotating order,
    a slow spell of a shared machine falls on every contender alike."""
    start = turn % len(items)
    return [*items[start:], *items[:start]]


def jsonable(value: Any) -> Any:
    """``json.dumps``'s ``default``: numpy scalars and arrays as numbers and lists, anything
    else as its string."""
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# --- the machine ----------------------------------------------------------------------------

def host_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's name, family and model, and its bfloat16 units (``backend.BFLOAT16_CPU_FLAGS``,
    what decides whether bfloat16 is fast on it); e.g. "AMD EPYC (family 25 model 1; bfloat16
    units: none)". The same name covers CPUs that differ in both. ``cpuinfo``: the text of
    /proc/cpuinfo, read when None."""
    from flax_captioner import backend

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return platform.processor() or "unknown"
    fields = dict(re.findall(r"^(model name|cpu family|model)\s*:\s*(.*)$", cpuinfo, re.MULTILINE))
    flags = backend.cpu_flags(cpuinfo)
    units = "unknown" if flags is None else (
        ", ".join(flag for flag in backend.BFLOAT16_CPU_FLAGS if flag in flags) or "none")
    return (f"{fields.get('model name', platform.processor() or 'unknown')} (family "
            f"{fields.get('cpu family', '?')} model {fields.get('model', '?')}; bfloat16 "
            f"units: {units})")


def machine() -> str:
    """"<cpu_model()>, N cores": the host a report's numbers come from."""
    return f"{cpu_model()}, {host_cores()} cores"


# --- synthetic inputs -----------------------------------------------------------------------

def seeded_pixels(batch: int, image_size: int, seed: int = 0) -> np.ndarray:
    """float32[B, 3, S, S] in [-1, 1], the range of normalized nlpconnect inputs."""
    return np.random.default_rng(seed).uniform(
        -1, 1, (batch, 3, image_size, image_size)).astype(np.float32)


def write_photo_jpegs(directory: Path, count: int, size: tuple[int, int] = (640, 480), *,
                      distinct: int | None = None) -> list[str]:
    """``count`` photo-sized JPEGs (COCO's typical 640x480): smooth colour fields plus noise,
    so they compress and decode like photographs rather than like flat colour or pure noise.

    ``distinct``: only that many are drawn (into ``directory/distinct``) and copied round-robin
    to make ``count``; the decode work per file is the same, and drawing thousands takes
    minutes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if distinct is not None and distinct < count:
        sources = write_photo_jpegs(directory / "distinct", distinct, size)
        paths = [str(directory / f"photo_{index:05d}.jpg") for index in range(count)]
        for index, path in enumerate(paths):
            shutil.copyfile(sources[index % distinct], path)
        return paths
    from PIL import Image

    width, height = size
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                            np.int16)
        noisy = smooth + rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        path = directory / f"photo_{index:05d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


# --- the kernel choices the benchmarks switch -----------------------------------------------
# Every ``Generator`` of the benchmarks is built by ``make_generator``; a choice switches one
# field of the platform's ``backend.Kernels``.

def other_form(platform: str, field: str, dtype: str = "float32") -> str:
    """The first unfused form of ``backend.Kernels`` field ``field`` that devices of
    ``platform`` do not use for ``dtype`` (``backend.KERNELS``)."""
    from flax_captioner import backend, model

    used = getattr(backend.kernels(platform, dtype), field)
    return next(form for form in backend.FORMS[field]
                if form not in model.FUSED_FORMS and form != used)


def is_fused_cross_context(choices: dict[str, Any]) -> bool:
    """Whether ``choices`` run the cross-attention through a fused kernel (cuDNN's, XLA's)."""
    from flax_captioner import model

    return choices.get("cross_context") in model.FUSED_FORMS


def make_generator(params: Any, config: Any, choices: dict[str, Any] | None = None,
                   **placement: Any) -> Any:
    """A ``Generator`` with the ``backend.Kernels`` fields in ``choices`` switched from the
    platform's (``{}``: the platform's own), and ``placement``: its ``dtype`` and a mesh or
    single-device ``data_parallel`` (the benchmarks run no pmap)."""
    import jax

    from flax_captioner import backend
    from flax_captioner.generator import Generator

    devices = placement["data_parallel"].devices if "data_parallel" in placement else jax.devices()
    kernels = (backend.kernels(devices[0].platform, placement.get("dtype", "float32"), **choices)
               if choices else None)
    return Generator(params, config, kernels=kernels, **placement)


# --- the other frameworks -------------------------------------------------------------------

def torch_generate(model: Any, pixels: np.ndarray, settings: Any, device: str = "cpu",
                   dtype: Any = None, autocast: bool = False) -> np.ndarray:
    """PyTorch ``generate`` from host pixels to host tokens, int32 [N, max_length], padded as
    ``parity.pytorch_generate`` pads; float32 runs with TF32 off (matmul and cuDNN), and
    ``autocast`` runs float32 weights under bfloat16 autocast."""
    import contextlib

    import torch

    from flax_captioner.parity import pytorch_generate_kwargs, pytorch_without_tf32

    kwargs = pytorch_generate_kwargs(settings) | dict(output_scores=False,
                                                      return_dict_in_generate=False)
    mixed = (torch.autocast(device, dtype=torch.bfloat16) if autocast
             else contextlib.nullcontext())
    with torch.no_grad(), pytorch_without_tf32(), mixed:
        inputs = torch.from_numpy(pixels).to(device, dtype or torch.float32)
        generated = model.generate(pixel_values=inputs, **kwargs).cpu().numpy()
    fill = settings.pad_token_id
    if settings.num_beams > 1:
        fill = settings.pad_token_id or settings.eos_token_id
    sequences = np.full((len(generated), settings.max_length), fill, np.int32)
    sequences[:, :generated.shape[1]] = generated
    return sequences


def hf_flax_generate(model: Any, settings: Any, pixels: Any, precision: str | None = None
                     ) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """transformers' Flax ``generate`` under ``jax.jit``, compiled for ``pixels`` (an array
    or a ``jax.ShapeDtypeStruct``) at ``precision`` (None: the process's default matmul
    precision); returns (pixels -> host tokens, compile seconds)."""
    import contextlib

    import jax

    params = jax.device_put(model.params)

    def search(params: Any, pixels: Any) -> Any:
        with (jax.default_matmul_precision(precision) if precision
              else contextlib.nullcontext()):
            return model.generate(pixels, params=params, max_length=settings.max_length,
                                  num_beams=settings.num_beams,
                                  decoder_start_token_id=settings.decoder_start_token_id,
                                  pad_token_id=settings.pad_token_id,
                                  eos_token_id=settings.eos_token_id).sequences

    compiled, compile_seconds = timed(lambda: jax.jit(search).lower(params, pixels).compile())
    return lambda pixels: np.asarray(compiled(params, pixels)), compile_seconds
