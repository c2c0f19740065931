"""Data parallelism over a process's local devices, and the slicing of inputs across processes.

Three placements share one small protocol (``DataParallel``) that the generator uses:

- ``"mesh"`` (default): ``jax.jit`` over a 1-D ``Mesh`` of the local devices; the batch is
  split along a ``"data"`` axis (``NamedSharding``), parameters are replicated.
- ``"pmap"``: ``jax.pmap`` as in the Flax training recipe the checkpoint came from;
  parameters are stacked once per device, the batch is reshaped ``[D, B / D, ...]`` and back.
- ``"none"``: ``jax.jit`` on one device.

Multi-host (``jax.distributed.initialize()``): every process places work on its own local
devices only and handles ``process_slice(items, jax.process_index(), jax.process_count())``
of the inputs; no computation spans hosts, so hosts need no fast interconnect.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import jax
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from flax_captioner.options import PARALLELISM as MODES
DATA_AXIS = "data"

Item = TypeVar("Item")
# fn(params, *batch_args) -> pytree of outputs; every batch arg and output has batch axis 0.
BatchFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Program:
    """A batch function compiled for a placement: call it as ``fn(params, *batch_args)``.

    ``compile(params, *batch_args)`` compiles it ahead of time for those arguments' shapes
    (JAX's AOT ``lower(...).compile()``; the batch is not copied to the devices for it), so a
    caller can time compilation apart from running; the next call with such arguments reuses
    the executable (tests/test_sharding.py checks that no call compiles again; measured in
    docs/results/history.md, "Start-up and compilation").
    """

    call: BatchFn
    lower: Callable[..., Any]  # (params, *batch_args) -> jax.stages.Lowered

    def __call__(self, params: Any, *batch_args: Any) -> Any:
        return self.call(params, *batch_args)

    def compile(self, params: Any, *batch_args: Any) -> None:
        self.lower(params, *batch_args).compile()


class DataParallel(Protocol):
    """How a batch function is placed on devices.

    ``wrap(fn)`` turns ``fn(params, *batch_args)`` (batch axis 0 on every argument after
    ``params`` and on every output) into a compiled function of *global* batches whose size
    is a multiple of ``num_shards``; its outputs are global arrays (``np.asarray`` fetches
    them). ``params`` must come from ``replicate``.
    """

    num_shards: int
    devices: list[jax.Device]

    def replicate(self, params: Any) -> Any:
        """Places ``params`` where the wrapped functions expect them."""

    def padded_size(self, rows: int) -> int:
        """``rows`` rounded up to a multiple of ``num_shards``."""

    def put_batch(self, batch: Any) -> Any:
        """Places a pytree of global host arrays (batch axis 0) as the wrapped functions take
        them; the row count must be a multiple of ``num_shards``."""

    def wrap(self, fn: BatchFn, compiler_options: dict[str, Any] | None = None) -> Program:
        """Compiles ``fn`` for this placement (on first call, or ``Program.compile``), with
        XLA ``compiler_options`` where the placement takes them (not ``pmap``)."""


def _padded_size(rows: int, num_shards: int) -> int:
    return -(-rows // num_shards) * num_shards


def _placed_shapes(batch_args: Sequence[Any], placement: Sharding) -> tuple:
    """Shapes of ``batch_args`` as ``put_batch`` places them, to lower a program for its
    calls without copying a batch to the devices first."""
    return tuple(jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=placement)
                 for array in batch_args)


def _check_divisible(batch_args: Sequence[Any], num_shards: int) -> None:
    for array in batch_args:
        if array.shape[0] % num_shards:
            raise ValueError(
                f"batch of {array.shape[0]} rows does not split over {num_shards} devices; "
                f"pad it to a multiple of {num_shards} first (sharding.pad_to_multiple)")


class SingleDevice:
    """``jax.jit`` on one device (``"none"``)."""

    num_shards = 1

    def __init__(self, device: jax.Device | None = None):
        self.device = device or jax.local_devices()[0]
        self.devices = [self.device]

    def replicate(self, params: Any) -> Any:
        return jax.device_put(params, self.device)

    def padded_size(self, rows: int) -> int:
        return rows

    def put_batch(self, batch: Any) -> Any:
        return jax.device_put(batch, self.device)

    def wrap(self, fn: BatchFn, compiler_options: dict[str, Any] | None = None) -> Program:
        compiled = jax.jit(fn, compiler_options=compiler_options)

        def on_device(params: Any, *batch_args: Any) -> Any:
            return compiled(params, *self.put_batch(batch_args))

        return Program(on_device, lambda params, *batch_args: compiled.lower(
            params, *_placed_shapes(batch_args, SingleDeviceSharding(self.device))))


class MeshDataParallel:
    """``jax.jit`` over a 1-D mesh of local devices, batch split on the ``"data"`` axis."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = list(devices)
        self.mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
        self.num_shards = len(devices)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_split = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def replicate(self, params: Any) -> Any:
        return jax.device_put(params, self.replicated)

    def padded_size(self, rows: int) -> int:
        return _padded_size(rows, self.num_shards)

    def put_batch(self, batch: Any) -> Any:
        """Splits a pytree of host arrays (batch axis 0) over the mesh.

        Explicit placement: under jax.distributed, jit refuses host arrays for sharded
        inputs, while device_put onto local devices is always allowed.
        """
        return jax.device_put(batch, self.batch_split)

    def wrap(self, fn: BatchFn, compiler_options: dict[str, Any] | None = None) -> Program:
        # The batch args travel as one tuple so a single sharding prefix covers any number.
        compiled = jax.jit(
            lambda params, batch_args: fn(params, *batch_args),
            in_shardings=(self.replicated, self.batch_split),
            out_shardings=self.batch_split, compiler_options=compiler_options)

        def sharded(params: Any, *batch_args: Any) -> Any:
            _check_divisible(batch_args, self.num_shards)
            return compiled(params, self.put_batch(batch_args))

        # Lowered for arguments placed as calls place them: lowered from host arrays, the
        # program would compile again at the first call (tests/test_sharding.py checks not).
        return Program(sharded, lambda params, *batch_args: compiled.lower(
            params, _placed_shapes(batch_args, self.batch_split)))


class PmapDataParallel:
    """``jax.pmap`` over local devices: params stacked per device, batch ``[D, B / D, ...]``."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = list(devices)
        self.num_shards = len(self.devices)

    def replicate(self, params: Any) -> Any:
        return jax_utils.replicate(params, devices=self.devices)

    def padded_size(self, rows: int) -> int:
        return _padded_size(rows, self.num_shards)

    def put_batch(self, batch: Any) -> Any:
        """Host arrays stay on the host: the wrapped ``pmap`` splits them over devices."""
        return batch

    def wrap(self, fn: BatchFn, compiler_options: dict[str, Any] | None = None) -> Program:
        if compiler_options:
            raise ValueError("compiler_options need the mesh or single-device placement: "
                             "jax.pmap takes none")
        mapped = jax.pmap(lambda params, batch_args: fn(params, *batch_args),
                          axis_name=DATA_AXIS, devices=self.devices)

        def per_device(batch_args: tuple) -> tuple:
            _check_divisible(batch_args, self.num_shards)
            return tuple(array.reshape((self.num_shards, -1) + array.shape[1:])
                         for array in batch_args)

        def sharded(params: Any, *batch_args: Any) -> Any:
            outputs = mapped(params, per_device(batch_args))
            return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), outputs)

        return Program(sharded, lambda params, *batch_args: mapped.lower(
            params, per_device(batch_args)))


def data_parallel(mode: str = "mesh",
                  devices: Sequence[jax.Device] | None = None) -> DataParallel:
    """The placement for ``mode`` (``"mesh"``, ``"pmap"`` or ``"none"``) over ``devices``.

    ``devices`` defaults to this process's local devices (all of them for ``"mesh"`` and
    ``"pmap"``, the first for ``"none"``).
    """
    if mode not in MODES:
        raise ValueError(f"parallelism must be one of {', '.join(MODES)}; got {mode!r}")
    devices = list(devices) if devices is not None else jax.local_devices()
    if mode == "none":
        return SingleDevice(devices[0])
    if mode == "pmap":
        return PmapDataParallel(devices)
    return MeshDataParallel(devices)


def pad_to_multiple(batch: np.ndarray, multiple: int) -> np.ndarray:
    """Pads ``batch [B, ...]`` along axis 0 to a multiple of ``multiple`` by repeating row 0.

    Repeating a real row (rather than zeros) keeps padded rows numerically ordinary, and in
    a deterministic search the copies finish with their original, so they never keep the
    decode loop running; the caller drops outputs past ``B``.
    """
    missing = -batch.shape[0] % multiple
    if not missing:
        return batch
    return np.concatenate([batch, np.repeat(batch[:1], missing, axis=0)], axis=0)


def process_slice(items: Iterable[Item], process_index: int,
                  process_count: int) -> Iterator[Item]:
    """The items process ``process_index`` of ``process_count`` handles: every
    ``process_count``-th one, starting at ``process_index``.

    Striding (rather than contiguous blocks) needs no item count, so inputs can stream;
    the per-process outputs interleave back into input order round-robin.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} outside 0..{process_count - 1}")
    return itertools.islice(items, process_index, None, process_count)
