"""Fast, exact conversion between Flower ``Array`` payloads (the ``.npy`` format) and NumPy / torch.

Flower stores every array of a message as an ``np.save`` payload and decodes it with ``np.load``: some
25 µs of file-format parsing per array, which a client pays for every array of every call and the server
twice per reply (validation, then aggregation). For a C-ordered array the payload is the standard header
of its dtype and shape followed by the raw bytes, so these helpers build that header once per layout (with
NumPy's own header writer) and read or write the bytes directly. A payload whose header differs (Fortran
order, another format version, a dtype or shape field that does not match, a truncated body) goes through
Flower's own path, so the result is always what ``Array.numpy()`` would give, or the same error.
"""

from __future__ import annotations

import functools
import io
import math
import operator
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType


@functools.lru_cache(maxsize=4096)
def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    fields = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, fields)
    except ValueError:  # the header does not fit format 1.0's 16-bit length field
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, fields)
    return buf.getvalue()


@functools.lru_cache(maxsize=4096)
def _standard_layout(dtype: str, shape: tuple) -> tuple[np.dtype, tuple[int, ...], bytes, int] | None:
    """``(dtype, shape, header, payload length)`` of the standard payload, or ``None`` for layouts the fast
    path leaves to Flower (object dtypes, negative or non-integer sizes, unknown dtype names)."""
    try:
        np_dtype = np.dtype(dtype)
        dims = tuple(operator.index(n) for n in shape)
    except (TypeError, ValueError):
        return None
    if np_dtype.hasobject or any(n < 0 for n in dims):
        return None
    header = npy_header(str(np_dtype), dims)
    return np_dtype, dims, header, len(header) + np_dtype.itemsize * math.prod(dims)


def _layout(array: Array) -> tuple[np.dtype, tuple[int, ...], bytes, int] | None:
    if array.stype != SType.NUMPY:
        return None
    try:
        return _standard_layout(array.dtype, tuple(array.shape))
    except TypeError:  # unhashable metadata
        return None


def to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, without parsing the header when it is the standard one (a read-only view)."""
    layout = _layout(array)
    if layout is not None:
        dtype, shape, header, size = layout
        data = array.data
        if len(data) == size and data.startswith(header):
            return np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape)
    return array.numpy()


def from_numpy(values: np.ndarray) -> Array:
    """An ``Array`` holding ``values``, byte for byte what ``Array(values)`` gives for the usual dtypes."""
    if values.dtype.hasobject:
        return Array(values)  # Flower's path, which refuses to pickle
    if not values.flags.c_contiguous:
        values = values.copy(order="C")
    shape = tuple(int(n) for n in values.shape)
    header = npy_header(str(values.dtype), shape)
    return Array(dtype=str(values.dtype), shape=shape, stype=SType.NUMPY, data=header + values.tobytes())


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of ``record`` as a (read-only) NumPy array, in the record's order."""
    return {key: to_numpy(array) for key, array in record.items()}


def record_from_numpy(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of NumPy arrays, in the mapping's order."""
    return ArrayRecord({key: from_numpy(np.asarray(v)) for key, v in values.items()})


def record_to_state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``: writable CPU tensors, one per array."""
    return {key: torch.from_numpy(to_numpy(array).copy()) for key, array in record.items()}


def record_from_state_dict(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(state)`` for a torch state dict (tensors are detached and moved to the CPU)."""
    return ArrayRecord({key: from_numpy(t.detach().cpu().numpy()) for key, t in state.items()})
