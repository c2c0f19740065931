"""One prepared accelerator benchmark: parity, generator throughput, end to end, host decode.

Run on a machine with one GPU (``bash scripts/accelerator_benchmark.sh`` installs the carried
wheels first, then runs ``python -m scripts.accelerator``); it finishes in under 8 minutes
and writes ``accelerator-benchmark.json`` and ``accelerator-benchmark.md`` (plus
``workers.log``) into ``--out`` (default ``$OUT``, else ``./accelerator-benchmark-results``).
The four parts of issue 10:

1. environment: devices, driver, CPU, versions of jax/jaxlib/flax/transformers/torch;
2. parity on the device: the shipped shapes model, the three chaotic tiny checkpoints of
   tests/test_parity_generate.py and full-size random weights, exact mode (float32, "highest")
   against PyTorch float32 with TF32 off, for beam / greedy / min_length / no_repeat_ngram:
   mismatched captions (target 0); plus beam search with the other cross- and self-attention
   forms (``backend.KERNELS``) on the chaotic checkpoints;
3. generator throughput, nlpconnect architecture with random weights, 4 beams, max_length 16:
   ours at batch 64 / 256 / 1024 in float32 (exact) and bfloat16, PyTorch ``generate`` float32
   eager (TF32 off) and float16 / bfloat16 weights with SDPA attention at the same batches,
   HF Flax ``generate`` under jit at batch 64: images/s (host pixel values in, host tokens
   out; ours also streamed, batches dispatched one ahead as ``caption`` runs them, from the
   first dispatch and, a long job's rate, from the first result to the last), compile
   seconds, peak device memory; at batch 256, ours with one of ``backend.py``'s choices
   switched, to decide it for the platform (``throughput_variants``: the other
   cross-attention form, the other search loop, on GPUs cuDNN's fused attention and the
   other matmul backend); and one bfloat16 batch of 256 and one of 1,024, and one float32
   batch of 256, under ``jax.profiler``: kernels per step, the device's busy share, the
   host's input copy and program setup (``device_activity``; the traces are kept in
   ``traces/``);
4. end to end: 4,096 JPEGs (640x480) on local disk through ``pipeline.run_pipeline`` with a
   decode thread per host core, bfloat16, batch 256: exact decoding on threads, then on
   processes (``decode_processes``), then ``--fast-decode`` on processes: images/s, device
   input wait, decode capacity against device rate (which bounds the run), the calling
   process's CPU per image; plus host decode scaling: images/s against threads and processes.

Each heavy part runs in its own subprocess with its own time budget (its memory is its own,
and JAX does not hold the GPU memory PyTorch needs); a part skips the rows its remaining
budget cannot fit and says so, and a part that overruns is stopped with its rows so far kept.

Without a GPU the same parts run on the CPU at batch 8, with PyTorch bfloat16 autocast (what
a CPU user chasing speed would pick) beside our bfloat16. ``--smoke`` runs everything on CPU
with tiny models in about a minute (tests/test_accelerator_benchmark.py).

Modules: ``plan`` (profiles, parts, the order of the rows), ``workers`` (the measuring
processes), ``traces`` (device activity from profiler traces), ``report`` (JSON, targets,
Markdown), ``run`` (the orchestrator, ``python -m scripts.accelerator``).
"""

