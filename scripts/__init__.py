"""Benchmarks and tools, run from the repository root as ``python -m scripts.NAME``.

``scripts.common`` holds what several of them share (timing, synthetic JPEGs, the machine's
description, the kernel choices they switch); the seeded test checkpoints and the shapes
images come from ``flax_captioner.testing``, which the tests use too.
"""
