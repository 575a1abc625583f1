"""Memory-mapped safetensors reading and streaming writing with bf16 support, no torch needed."""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import QwenEdgeError

# safetensors dtype -> (numpy storage dtype, bytes per element). bf16 is stored as uint16 and widened on read.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bf16 bits (uint16) to float32 exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bits (uint16), round-to-nearest-even, NaN kept NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


class SafetensorsFile:
    """One `.safetensors` file: header parsed and validated, data memory-mapped on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise QwenEdgeError(f"{self.path.name}: truncated safetensors file (no header)")
                (hlen,) = struct.unpack("<Q", head)
                if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                    raise QwenEdgeError(f"{self.path.name}: corrupt safetensors header length {hlen}")
                header_bytes = f.read(hlen)
        except OSError as e:
            raise QwenEdgeError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            header = json.loads(header_bytes.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise QwenEdgeError(f"{self.path.name}: corrupt safetensors header ({str(e)[:200]})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + hlen
        data_len = size - self.data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in header.items():
            try:
                dtype = info["dtype"]
                shape = tuple(info["shape"])
                start, end = info["data_offsets"]
                if not all(type(x) is int for x in (*shape, start, end)):  # no bools, floats, strings
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise QwenEdgeError(f"{self.path.name}: malformed header entry for tensor {name[:80]!r}") from None
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise QwenEdgeError(f"{self.path.name}: tensor {name[:80]!r} has unknown dtype {dtype!r}")
            if any(d < 0 for d in shape):
                raise QwenEdgeError(f"{self.path.name}: tensor {name[:80]!r} has a negative dimension")
            expected = math.prod(shape) * DTYPES[dtype][1]  # Python ints: absurd shapes cannot wrap around
            if not (0 <= start <= end) or end - start != expected:
                raise QwenEdgeError(
                    f"{self.path.name}: tensor {name[:80]!r} byte range {start}..{end} does not match shape {list(shape)}"
                )
            if end > data_len:
                raise QwenEdgeError(
                    f"{self.path.name}: truncated: tensor {name[:80]!r} ends at byte {end} of {data_len} data bytes"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, self.path, self.data_start + start, end - start)
        self._mmap: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def raw(self, name: str) -> np.ndarray:
        """The stored array (bf16 as uint16 bits), a read-only view into the memory map."""
        info = self.tensors[name]
        np_dtype = DTYPES[info.dtype][0]
        count = info.nbytes // np_dtype.itemsize
        arr = np.frombuffer(self._map(), dtype=np_dtype, count=count, offset=info.offset)
        return arr.reshape(info.shape)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a view still references it; the OS unmaps when it is collected
            self._mmap = None


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_f32(raw)
    return raw.astype(np.float32)


def write_safetensors(path: Path, tensors: Iterable[tuple[str, str, tuple[int, ...], np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Stream tensors (name, safetensors dtype, shape, array in storage dtype) into one file.

    The tensors iterable is consumed twice-free: shapes come first from the tuples, so callers pass a list of
    lazily computed arrays via callables when memory matters (see `synth`).
    """
    items = list(tensors)
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape, _ in items:
        n = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for name, dtype, shape, arr in items:
            data = arr() if callable(arr) else arr
            data = np.ascontiguousarray(data, dtype=DTYPES[dtype][0])
            if data.shape != tuple(shape):
                raise ValueError(f"{name}: array shape {data.shape} != declared {shape}")
            f.write(data.tobytes())
            del data
        f.flush()
        os.fsync(f.fileno())


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def release_pages(raw: np.ndarray) -> None:
    """Drop the pages under a read-only memory-mapped view from this process's resident set (they stay in the page
    cache; a later read faults them back in). Without this every byte of the checkpoint read once stays resident
    until the export ends: 6 GB for Qwen2.5-3B in bf16. A writeable array is never touched: DONTNEED would zero
    anonymous memory."""
    if sys.platform != "linux" or raw.flags.writeable or raw.nbytes == 0:
        return
    lo = raw.ctypes.data
    hi = lo + raw.nbytes
    if raw.ndim > 1 and not raw.flags.c_contiguous:  # a column slice spans its parent's rows
        hi = lo + (raw.shape[0] - 1) * raw.strides[0] + raw.shape[-1] * raw.itemsize
    start = lo - lo % _PAGE
    try:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(hi - start),
                                                  _MADV_DONTNEED)
    except (OSError, AttributeError):
        pass
