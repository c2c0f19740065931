"""PyTorch's ``pytorch_model.bin`` read without PyTorch: the zip archive ``torch.save`` has
written since torch 1.6, a pickle of tensors whose bytes sit beside it.

Only what a state dict holds is rebuilt (tensors over typed storages, in an ``OrderedDict``);
any other object in the pickle is refused, as ``torch.load(weights_only=True)`` refuses it, so
a weights file cannot run code. Files of the older non-zip format still need PyTorch.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# torch's typed storages by the name the pickle gives them.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class NotAZipCheckpoint(ValueError):
    """The file is not ``torch.save``'s zip format (the legacy format needs PyTorch)."""


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a (strided) view of ``storage``, copied."""
    strides = tuple(step * storage.itemsize for step in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], size, strides).copy()


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"holds {module}.{name}, not only tensors")

    def persistent_load(self, pid: Any) -> np.ndarray:
        # ("storage", storage type, key, location, element count)
        _, storage_type, key, _, count = pid
        data = self._archive.read(f"{self._prefix}/data/{key}")
        return np.frombuffer(data, _STORAGE_DTYPES[storage_type], count)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``{name: array}`` of a ``torch.save``'d state dict, in PyTorch's names and layouts.

    Raises:
      NotAZipCheckpoint: the file predates torch's zip format.
      pickle.UnpicklingError, zipfile.BadZipFile, KeyError, OSError, ValueError, EOFError: a
        damaged or foreign file.
    """
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            if file.read(1) == b"\x80":  # a bare pickle: torch.save before 1.6
                raise NotAZipCheckpoint(f"{path}: not torch.save's zip format")
        raise ValueError("neither a zip archive nor a pickle")
    with zipfile.ZipFile(path) as archive:
        pickled = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
        prefix = pickled[: -len("/data.pkl")]
        with archive.open(pickled) as file:
            state = _StateDictUnpickler(file, archive, prefix).load()
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"holds a {type(state).__name__}, not a state dict")
    return dict(state)
