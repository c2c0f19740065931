"""The measuring side: each worker runs in its own process under its own time budget and
appends JSON lines to ``WORK/<worker>.jsonl`` as it goes (``Recorder``), so a stopped worker
loses nothing."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scripts.accelerator.plan import (DECODE_SCALING, MAX_LENGTH, NUM_BEAMS, PIPELINES, Profile,
                                      decode_options, parity_models,
                                      parity_other_forms, parity_settings, throughput_estimates,
                                      throughput_plan, throughput_variants)
from scripts.accelerator.traces import profiled_call
from scripts.common import (host_cores, host_cpu_seconds, hf_flax_generate, jsonable,
                            make_generator, process_cpu_seconds, seeded_pixels, timed, torch_generate,
                            write_photo_jpegs)


class Recorder:
    """Appends one JSON object per line, flushed at once, so a stopped worker loses nothing."""

    def __init__(self, path: Path, deadline: float):
        self.path = path
        self.deadline = deadline

    def emit(self, kind: str, **data: Any) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"kind": kind, **data}, default=jsonable) + "\n")

    def fits(self, what: str, estimate: float) -> bool:
        """Whether ``estimate`` seconds still fit the budget; records a skip when not, and
        that ``what`` starts when so (``run_worker`` names it if the budget ends first)."""
        left = self.deadline - time.time()
        if estimate <= left:
            self.emit("started", what=what, at=time.time())
            return True
        self.emit("skipped", what=what,
                  why=f"needs ~{estimate:.0f} s, {max(left, 0):.0f} s of the budget left")
        return False


def timed_repeats(call: Callable[[], Any], repeats: int, recorder: Recorder,
                  what: str) -> tuple[float, list[float]]:
    """Seconds of a first call, then of ``repeats`` timed calls, none where those no longer
    fit the budget (a speed guess far off)."""
    _, first = timed(call)
    if not recorder.fits(f"{what}, timed batches", repeats * first):
        return first, []
    return first, [timed(call)[1] for _ in range(repeats)]


def check_backend(profile: Profile, recorder: Recorder) -> None:
    """A GPU run must see the GPU from JAX (and PyTorch where imported); stops otherwise."""
    import jax

    recorder.emit("info", jax_backend=jax.default_backend(),
                  jax_devices=[f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip()
                               for d in jax.devices()])
    if profile.name == "gpu" and jax.default_backend() not in ("gpu", "cuda", "rocm"):
        recorder.emit("error", message=f"JAX runs on {jax.default_backend()}, not the GPU: "
                      "the GPU rows would be CPU numbers; stopped")
        raise SystemExit(3)


def torch_device(profile: Profile) -> str:
    """"cuda" on a GPU run (stops where PyTorch sees none), else "cpu"."""
    import torch

    if profile.name == "gpu" and not torch.cuda.is_available():
        raise SystemExit("PyTorch sees no CUDA device on a GPU run")
    return "cuda" if profile.name == "gpu" else "cpu"


def run_parity(work: Path, profile: Profile, recorder: Recorder) -> None:
    """Exact-mode captions against PyTorch float32's on each of ``parity_models``, for each
    of ``parity_settings``; the chaotic checkpoints' beam search also with the other kernel
    forms (``parity_other_forms``)."""
    import jax
    import torch
    from transformers import VisionEncoderDecoderModel

    from flax_captioner import loading
    from flax_captioner.model import ModelSpec
    from flax_captioner.settings import GenerationSettings

    check_backend(profile, recorder)
    device = torch_device(profile)
    recorder.emit("info", torch_device=torch.cuda.get_device_name(0) if device == "cuda"
                  else "cpu")
    generators: dict[ModelSpec, Any] = {}  # same architecture: same compiled programs
    other_forms = parity_other_forms(jax.devices()[0].platform)
    other_generators: dict[tuple[str, ModelSpec], Any] = {}
    for name, directory, make_pixels, max_length in parity_models(work, profile):
        # A row is mostly its compile; the first of a model is guessed, the rest measured.
        estimate = 20.0 if profile.full_size and name.startswith("full") else 8.0
        checkpoint = loading.load_checkpoint(directory)
        pixels = make_pixels(checkpoint.preprocess_config)
        reference = VisionEncoderDecoderModel.from_pretrained(directory).to(device).eval()
        architecture = ModelSpec.from_config(checkpoint.config)
        generator = generators.get(architecture)
        swap = {}
        if generator is None:
            generator = generators[architecture] = make_generator(
                checkpoint.params, checkpoint.config)
        else:  # the compiled programs of the first model with these shapes, other weights
            swap = {"params": generator.data_parallel.replicate(checkpoint.params)}
            estimate = 2.0
        for setting, overrides in parity_settings(max_length):
            if not recorder.fits(f"parity {name} {setting}", estimate):
                continue
            settings = GenerationSettings.resolve(checkpoint.generation_defaults, **overrides)
            started = time.perf_counter()
            ours = generator.generate(pixels, settings, **swap).sequences
            theirs = torch_generate(reference, pixels, settings, device)
            differs = np.flatnonzero((ours != theirs).any(axis=1))
            estimate = time.perf_counter() - started
            recorder.emit("parity", model=name, setting=setting, captions=len(ours),
                          mismatched=len(differs), first_mismatch=differs[:1].tolist(),
                          seconds=estimate)
        for form, switched in other_forms.items():
            if not (name.startswith("chaotic")
                    and recorder.fits(f"parity {name} beam, {form}", 10.0)):
                continue
            if (form, architecture) not in other_generators:
                other_generators[form, architecture] = make_generator(
                    checkpoint.params, checkpoint.config, switched)
            other = other_generators[form, architecture]
            settings = GenerationSettings.resolve(checkpoint.generation_defaults,
                                                  **parity_settings(max_length)[0][1])
            started = time.perf_counter()
            ours = other.generate(pixels, settings, params=other.data_parallel.replicate(
                checkpoint.params)).sequences
            theirs = torch_generate(reference, pixels, settings, device)
            differs = np.flatnonzero((ours != theirs).any(axis=1))
            recorder.emit("parity", model=name, setting=f"beam, {form}",
                          captions=len(ours), mismatched=len(differs),
                          first_mismatch=differs[:1].tolist(),
                          seconds=time.perf_counter() - started)
        del reference
        if device == "cuda":
            torch.cuda.empty_cache()


def run_torch_throughput(work: Path, profile: Profile, recorder: Recorder) -> None:
    """PyTorch ``generate``'s images/s for each of the profile's ``torch_variants`` and
    batches, largest batch first."""
    import torch
    from transformers import VisionEncoderDecoderModel

    from flax_captioner import loading

    device = torch_device(profile)
    torch.set_grad_enabled(False)
    settings = throughput_settings(work)
    image_size = loading.read_config(work / "full").encoder.image_size
    seconds_per_image = {"gpu": 1 / 300, "cpu": 1.0, "smoke": 0.2}[profile.name]  # a guess
    overhead = 10.0 if profile.full_size else 2.0
    for variant in profile.torch_variants:
        dtype = {"float16-sdpa": torch.float16, "bfloat16-sdpa": torch.bfloat16}.get(variant)
        extra = {"attn_implementation": "sdpa"} if variant.endswith("sdpa") else {}
        try:
            model = VisionEncoderDecoderModel.from_pretrained(work / "full", **extra)
        except (ValueError, ImportError) as error:  # SDPA unsupported by this transformers
            recorder.emit("info", torch_sdpa_unavailable=str(error).splitlines()[0])
            model = VisionEncoderDecoderModel.from_pretrained(work / "full")
        model = model.to(device, dtype or torch.float32).eval()
        attention = getattr(model.config.decoder, "_attn_implementation", None)
        # Largest first: PyTorch's best batch (what the targets compare with) has been its
        # largest on GPUs, and a short budget drops the last rows.
        for batch in sorted(profile.batches, reverse=True):
            what = f"pytorch {variant} batch {batch}"
            estimate = overhead + (profile.repeats + 1) * batch * seconds_per_image
            if not recorder.fits(what, estimate):
                continue
            pixels = seeded_pixels(batch, image_size)

            def call() -> np.ndarray:
                sequences = torch_generate(model, pixels, settings, device, dtype,
                                           autocast=variant == "bfloat16-autocast")
                if device == "cuda":
                    torch.cuda.synchronize()
                return sequences

            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                first, repeats = timed_repeats(call, profile.repeats, recorder, what)
            except torch.cuda.OutOfMemoryError as error:
                recorder.emit("throughput", framework="pytorch", variant=variant, batch=batch,
                              error="out of memory: " + str(error).splitlines()[0][:120])
                torch.cuda.empty_cache()
                continue
            # PyTorch compiles nothing: where the timed batches did not fit, its first call
            # is the row's one measurement.
            seconds = repeats or [first]
            median = statistics.median(seconds)
            seconds_per_image = median / batch
            recorder.emit(
                "throughput", framework="pytorch", variant=variant, batch=batch,
                images_per_second=batch / median, batch_seconds=seconds, compile_seconds=None,
                first_call_seconds=first, attention=attention,
                timed=None if repeats else "first call only",
                peak_gib=(torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
                          else None))
        model = None  # frees its device memory before the next variant loads
        if device == "cuda":
            torch.cuda.empty_cache()


def throughput_settings(work: Path) -> Any:
    """The throughput rows' search: the 'full' model's defaults, NUM_BEAMS, MAX_LENGTH."""
    from flax_captioner import loading
    from flax_captioner.settings import GenerationSettings

    config = loading.read_config(work / "full")
    return GenerationSettings.resolve(loading.generation_defaults(config, work / "full"),
                                      num_beams=NUM_BEAMS, max_length=MAX_LENGTH)


def device_peak_bytes() -> int | None:
    """The first local device's peak memory in use (None where the backend has no such
    statistic)."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def run_jax_throughput(work: Path, profile: Profile, recorder: Recorder) -> None:
    """Ours (each of ``throughput_variants``) and HF Flax, the rows of ``throughput_plan``
    in order: images/s one batch at a time and streamed, compile seconds, peak memory, and
    the profiled batches."""
    import jax
    import jax.numpy as jnp

    from flax_captioner import backend, hf_flax, loading, sharding
    from flax_captioner.errors import CaptionerError
    from flax_captioner.generator import enable_compilation_cache

    check_backend(profile, recorder)
    # Shared with the end-to-end worker, which then loads the batch-256 program from disk.
    enable_compilation_cache(work / "jax-cache")
    checkpoint = loading.load_checkpoint(work / "full")
    settings = throughput_settings(work)
    image_size = checkpoint.config.encoder.image_size
    variants = throughput_variants(jax.devices()[0].platform, profile.name == "gpu")
    generators: dict[str, Any] = {}

    @functools.cache
    def hf_flax_model() -> Any:
        """transformers' ``FlaxVisionEncoderDecoderModel`` holding the checkpoint's weights
        (built once, on its first row)."""
        return hf_flax.to_flax_model(checkpoint.params, checkpoint.config)

    def generator_for(variant: str) -> Any:
        if variant not in generators:
            dtype = variant.split()[0]
            generators[variant] = make_generator(
                checkpoint.params, checkpoint.config, variants[variant],
                dtype=getattr(jnp, dtype), data_parallel=sharding.data_parallel("mesh"))
        return generators[variant]

    plan = throughput_plan(variants, profile.batches, profile.hf_flax_batch)
    # Guesses until measured, then the last measurement of that kind.
    compile_estimate, per_image = throughput_estimates(profile.name)
    # JAX's peak memory only grows: a row's peak is its own where it exceeds every earlier one.
    previous_peak = 0
    measured = set()  # the (framework, variant, batch) rows run so far
    for framework, dtype, batch in plan:
        what = f"{framework} {dtype} batch {batch}"
        if framework == "profile":  # a batch whose program an earlier row compiled
            if ("ours", dtype, batch) not in measured:
                recorder.emit("skipped", what=what, why=f"ours {dtype} batch {batch} not run")
            elif recorder.fits(what, 15 + 3 * batch * per_image["ours", dtype]):
                pixels = seeded_pixels(batch, image_size)
                generator = generator_for(dtype)
                recorder.emit("profile", variant=dtype, batch=batch,
                              steps=settings.max_length - 1, **profiled_call(
                                  lambda: generator.generate(pixels, settings).sequences,
                                  work / "traces" / f"{dtype}-{batch}"))
            continue
        if framework == "hf-flax" and not hf_flax.available():
            import transformers

            recorder.emit("skipped", what=what,
                          why=f"transformers {transformers.__version__} has no "
                          "FlaxVisionEncoderDecoderModel (removed in 5.0); HF Flax is "
                          "measured only where transformers < 5 is installed")
            continue
        kind = (framework, dtype.split()[0])
        # A variant that changes XLA's options has its own compile estimate.
        compiled_as = (framework, dtype) if (framework, dtype) in compile_estimate else kind
        # Ours runs its batches twice: one at a time, then streamed (dispatched one ahead,
        # after two untimed).
        streamed_batches = profile.repeats + 3
        batches_run = profile.repeats + 1 + (streamed_batches + 2 if framework == "ours" else 0)
        estimate = (compile_estimate[compiled_as] + batches_run * batch
                    * per_image.get((framework, dtype), per_image[kind]))
        if not recorder.fits(what, estimate):
            continue
        pixels = seeded_pixels(batch, image_size)
        try:
            if framework == "ours":
                generator = generator_for(dtype)
                call = lambda: generator.generate(pixels, settings).sequences  # noqa: E731
                compiled_before = generator.compile_seconds
                _, first = timed(call)  # compiles ahead of running, timed apart
                compile_seconds = generator.compile_seconds - compiled_before
            else:  # float32 at "highest" precision, as ours in the exact mode
                generate, compile_seconds = hf_flax_generate(hf_flax_model(), settings,
                                                             pixels, precision="highest")
                call = lambda: generate(pixels)  # noqa: E731
                _, first = timed(call)
            seconds = [timed(call)[1] for _ in range(profile.repeats)]
            streamed, steady = (streamed_run(generator, pixels, settings, streamed_batches)
                                if framework == "ours" else (None, None))
        except Exception as error:  # noqa: BLE001 - out of memory, or a variant's failure
            switched = bool(variants.get(dtype))  # one of backend.py's choices switched
            if (not isinstance(error, CaptionerError) and not backend.is_out_of_memory(error)
                    and not switched):
                raise  # a switched row records what failed (XLA options, cuDNN's limits)
            recorder.emit("throughput", framework=framework, variant=dtype, batch=batch,
                          error=str(error).splitlines()[0][:200])
            continue
        median = statistics.median(seconds)
        compile_estimate[compiled_as] = 1.2 * compile_seconds + 2
        per_image[framework, dtype] = median / batch
        peak = device_peak_bytes()
        recorder.emit(
            "throughput", framework=framework, variant=dtype, batch=batch,
            images_per_second=batch / median, batch_seconds=seconds,
            streamed_images_per_second=streamed, steady_images_per_second=steady,
            compile_seconds=compile_seconds, first_call_seconds=first,
            peak_gib=None if peak is None else peak / 2**30,
            peak_attributable=None if peak is None else peak > previous_peak)
        previous_peak = max(previous_peak, peak or 0)
        measured.add((framework, dtype, batch))


def streamed_run(generator: Any, pixels: np.ndarray, settings: Any,
                 batches: int) -> tuple[float, float]:
    """``batches`` batches of ``pixels`` dispatched one ahead (``device_loop.one_ahead``), as
    ``caption`` and the Ray path run theirs: a batch's pixels are copied and its program
    launched while the batch before runs on the device. Returns (images/s over the whole run,
    images/s between the first result and the last): the first includes the first batch's
    input copy and program setup, which nothing overlaps; the second leaves them out, as a
    long job pays them once.

    Two untimed batches go first: two batches in flight need more device memory than one,
    and the first run that holds them pays for growing the allocator's pool (what a first
    streamed run showed on a GPU: docs/results/history.md, "Runs 5 and 6")."""
    from flax_captioner.device_loop import one_ahead

    def run(count: int) -> list[float]:
        """Seconds from the start to each batch's result, in order."""
        started = time.perf_counter()
        arrived = []
        for _, dispatched in one_ahead(range(count),
                                       lambda _: generator.dispatch(pixels, settings)):
            dispatched.result()
            arrived.append(time.perf_counter() - started)
        return arrived

    run(2)
    arrived = run(batches)
    images = len(pixels)
    return batches * images / arrived[-1], (batches - 1) * images / (arrived[-1] - arrived[0])


def run_end_to_end(work: Path, profile: Profile, recorder: Recorder) -> None:
    """Photo-like JPEGs through ``run_pipeline`` (exact decoding on threads, then on
    processes; the host decoding only, the program resizing, on processes; fast decoding on
    processes), the device resize's pixels against the host's, then the host's decode
    scaling."""
    import jax.numpy as jnp

    from flax_captioner import CaptionOptions, loading
    from flax_captioner.captioner import Captioner
    from flax_captioner.generator import enable_compilation_cache
    from flax_captioner.pipeline import run_pipeline

    cores = host_cores()
    recorder.emit("info", host_cores=cores)
    # At most 256 distinct files, copied round-robin: writing thousands takes the budget.
    paths, seconds = timed(lambda: write_photo_jpegs(work / "jpegs", profile.e2e_images,
                                                     profile.jpeg_size, distinct=256))
    recorder.emit("info", jpegs=len(paths), jpeg_size=list(profile.jpeg_size),
                  jpeg_write_seconds=seconds)
    check_backend(profile, recorder)
    enable_compilation_cache(work / "jax-cache")
    estimate = {"gpu": 40 + len(paths) / 1000, "cpu": 60 + len(paths), "smoke": 10}[profile.name]
    if recorder.fits("end-to-end pipeline", estimate):
        captioner = Captioner(loading.load_checkpoint(work / "full"), dtype=jnp.bfloat16)
        common = CaptionOptions(batch_size=profile.e2e_batch, decode_threads=cores,
                                decode_processes=False, resume=False, progress=False,
                                jpeg_decoder="pillow",
                                num_beams=NUM_BEAMS, max_length=MAX_LENGTH)
        # The first batch compiles (or loads the throughput worker's program from the cache);
        # so does the program that resizes on the device, a program of its own.
        _, warmup = timed(lambda: [run_pipeline(
            paths[:profile.e2e_batch], str(work / f"warmup-{on_device}.jsonl"),
            common.replace(resize_on_device=on_device), captioner) for on_device in (False, True)])
        wall = None
        for decode, workers in PIPELINES:
            options = decode_options(decode)
            if not decoder_installed(decode, f"end-to-end pipeline, {decode}", recorder):
                continue
            if wall is not None and not recorder.fits(
                    f"end-to-end pipeline, {decode} decode on {workers}", 1.2 * wall + 5):
                break
            # This process's CPU, every thread (the feed's, the device loop's, the JAX
            # runtime's), not the decode processes': at 1,000 / (ms per image) images/s on
            # one core's worth, the host process itself bounds the pipeline. The host's CPU,
            # every process: where the host's time per image goes, and how many cores it kept
            # busy.
            cpu, host_cpu = process_cpu_seconds(), host_cpu_seconds()
            stats = run_pipeline(paths, str(work / f"captions-{decode}-{workers}.jsonl"),
                                 common.replace(**options,
                                                decode_processes=workers == "processes"),
                                 captioner)
            wall = stats.wall_seconds
            recorder.emit("pipeline", decode=decode, workers=workers, dtype="bfloat16",
                          batch=profile.e2e_batch, images=len(paths), warmup_seconds=warmup,
                          caller_cpu_ms_per_image=1e3 * (process_cpu_seconds() - cpu) / len(paths),
                          **host_cpu_use(host_cpu, len(paths), stats.wall_seconds),
                          **pipeline_rates(stats, len(paths)))
    from flax_captioner.preprocess import PreprocessConfig

    config = PreprocessConfig.from_pretrained(work / "full")
    if recorder.fits("device resize pixels", 5):
        recorder.emit("pixels", **device_resize_agreement(paths, config, profile.e2e_batch))
    decode_scaling(paths, config, profile, recorder)


def device_resize_agreement(paths: list[str], config: Any, batch: int) -> dict[str, Any]:
    """The program's resize (``resize.pixel_values`` on the default device) against the host's
    ``preprocess`` on the first ``batch`` distinct JPEGs: bit-identical float32 or not."""
    import jax

    from flax_captioner import feed, resize
    from flax_captioner.preprocess import ImageDecoding, load_image, pixel_lut, preprocess
    from flax_captioner.sources import InputItem

    items = [InputItem(index, path) for index, path in enumerate(paths[:batch])]
    with feed.batches(items, config, len(items),
                      decoding=ImageDecoding(device_resize=True)) as batches:
        canvases = next(batches).pixel_values
    device = np.asarray(jax.jit(resize.pixel_values)(canvases.pixels, canvases.coefficients,
                                                     pixel_lut(config)))
    host = preprocess([load_image(path) for path in paths[:batch]], config)
    return {"images": len(items), "canvas_side": canvases.pixels.shape[1],
            "platform": jax.default_backend(), "bit_identical": bool(np.array_equal(device, host)),
            "values_differing": int(np.sum(device != host))}


def decoder_installed(decode: str, what: str, recorder: Recorder) -> bool:
    """Whether the JPEG decoder of ``decode`` (``decode_options``) is installed here; records
    ``what`` as skipped when not."""
    from flax_captioner import nvimagecodec

    if decode_options(decode)["jpeg_decoder"] != "nvimagecodec" or nvimagecodec.available():
        return True
    recorder.emit("skipped", what=what,
                  why="nvImageCodec is not installed (flax-captioner[nvimagecodec])")
    return False


def host_cpu_use(before: float | None, images: int, seconds: float) -> dict[str, Any]:
    """The host's CPU per image since ``host_cpu_seconds()`` gave ``before``, and the cores
    it kept busy on average over ``seconds`` (None without /proc/stat)."""
    after = host_cpu_seconds()
    if before is None or after is None:
        return {"host_cpu_ms_per_image": None, "host_cores_busy": None}
    return {"host_cpu_ms_per_image": 1e3 * (after - before) / images,
            "host_cores_busy": (after - before) / seconds}


def pipeline_rates(stats: Any, images: int) -> dict[str, Any]:
    """The pipeline's summary plus the two rates that bound it: decoding (images per second
    of all decode threads together) and the device (images per second of device time); the
    smaller one is the bound."""
    row = {name: getattr(stats, name, None) for name in (
        "images_per_second", "wall_seconds", "decode_seconds", "device_seconds",
        "input_wait_seconds", "decode_threads", "captioned", "errors")}
    decode_rate = (images * stats.decode_threads / stats.decode_seconds
                   if stats.decode_seconds else None)
    device_rate = images / stats.device_seconds if stats.device_seconds else None
    # The loop's own time: detokenizing, building and writing rows, while the next batch runs
    # on the device (device_loop.one_ahead); above that batch's device time, the device idles.
    row["rows_seconds"] = max(0.0, stats.wall_seconds - stats.device_seconds
                              - stats.input_wait_seconds - stats.compile_seconds)
    row.update(decode_capacity_images_per_second=decode_rate,
               device_images_per_second=device_rate,
               bound=None if not (decode_rate and device_rate) else
               "decode" if decode_rate < device_rate else "device")
    return row


def image_decoding(decode: str) -> Any:
    """The ``preprocess.ImageDecoding`` of a ``PIPELINES`` or ``DECODE_SCALING`` decode name
    (``decode_options``), for the rows that use the feed or the decode functions directly."""
    from flax_captioner.preprocess import ImageDecoding

    options = decode_options(decode)
    return ImageDecoding(fast=options["fast_decode"], device_resize=options["resize_on_device"],
                         jpeg_decoder=options["jpeg_decoder"])


def _decode_paths(paths: list[str], config: Any, decode: str) -> int:
    """Decodes ``paths`` in a worker as the feed's ``decode`` path does ("exact", "fast": and
    preprocesses; "decode-only...": what is left to the host when the program resizes);
    returns the bytes produced (the pixels stay in the worker: shipping them back would
    measure pickling, not decoding)."""
    from flax_captioner.decode_processes import decode_function

    decoding = image_decoding(decode)
    return sum(decode_function(decoding)(path, config, decoding=decoding).nbytes
               for path in paths)


def decode_scaling(paths: list[str], config: Any, profile: Profile,
                   recorder: Recorder) -> None:
    """Decode (PIL decode + resize + normalise) images/s against workers: the exact path on
    threads and on processes (a ``concurrent.futures`` pool), decoding only
    (``--resize-on-device``) on processes, the fast path (``--fast-decode``) on threads, every
    row running the same function over the same chunks (four per worker); then the captioning
    feed itself (``feed_rate``). Each row with the host's CPU per image."""
    forkserver = multiprocessing.get_context("forkserver")
    for mode, decode in DECODE_SCALING:
        if not decoder_installed(decode, f"decode {decode} {mode}", recorder):
            continue
        # The feed at the most workers only (the pipelines' count): its rows are the
        # pipelines' host side, to set beside them and beside the processes' rows.
        counts = profile.decode_workers[-1:] if mode == "feed" else profile.decode_workers
        for workers in counts:
            images = paths[:min(len(paths), 160 * workers)]
            if mode == "feed":  # a batch to start on, then at least four to time
                images = paths[:min(len(paths), max(len(images), 5 * profile.e2e_batch))]
            if not recorder.fits(f"decode {decode} {mode} {workers}",
                                 len(images) / (100 * workers) + 2):
                continue
            if mode == "feed":
                recorder.emit("decode", mode=mode, decode=decode, workers=workers,
                              images=len(images), **feed_rate(images, config, decode, workers,
                                                              profile.e2e_batch))
                continue
            chunks = [images[start::4 * workers] for start in range(4 * workers)]
            pool = (concurrent.futures.ThreadPoolExecutor(workers) if mode == "threads" else
                    concurrent.futures.ProcessPoolExecutor(workers, mp_context=forkserver))
            configs, decodes = [config] * len(chunks), [decode] * len(chunks)
            with pool:
                list(pool.map(_decode_paths, [[path] for path in images[:workers]], configs,
                              decodes))
                host_cpu = host_cpu_seconds()
                _, seconds = timed(lambda: list(pool.map(_decode_paths, chunks, configs,
                                                         decodes)))
            recorder.emit("decode", mode=mode, decode=decode, workers=workers,
                          images=len(images), seconds=seconds,
                          images_per_second=len(images) / seconds,
                          **host_cpu_use(host_cpu, len(images), seconds))


def feed_rate(paths: list[str], config: Any, decode: str, workers: int,
              batch: int) -> dict[str, Any]:
    """The captioning feed alone (``feed.batches`` on ``workers`` decode processes, batches
    released as soon as they arrive, no device): the pipelines' host side without their
    device loop. ``start_seconds``: entering the feed (starting its processes) to the first
    batch; the rate and the host's CPU count from there on, as the rows above count from
    warmed-up workers."""
    from flax_captioner import feed
    from flax_captioner.sources import InputItem

    decoding = image_decoding(decode)
    items = [InputItem(index, path) for index, path in enumerate(paths)]
    started = time.perf_counter()
    first = host_cpu = None
    images = 0
    with feed.batches(items, config, batch, num_threads=workers, decoding=decoding,
                      decode_processes=True) as batches:
        for decoded in batches:
            if first is None:
                first, host_cpu = time.perf_counter(), host_cpu_seconds()
            else:
                images += decoded.num_decoded
            decoded.release()
    seconds = time.perf_counter() - first
    return {"start_seconds": first - started, "seconds": seconds,
            "images_per_second": images / seconds if images else None,
            **host_cpu_use(host_cpu, max(images, 1), seconds)}


WORKER_FUNCTIONS = {"parity": run_parity, "torch_throughput": run_torch_throughput,
                    "jax_throughput": run_jax_throughput, "end_to_end": run_end_to_end}
