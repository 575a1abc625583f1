"""A small ONNX graph builder whose initializers stream, chunk by chunk, into one external-data file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
from onnx import TensorProto, helper

MS = "com.microsoft"
INLINE_MAX_BYTES = 64
"""Constants this small stay inside model.onnx (shape vectors, axes); everything else goes to the data file."""
PAGE_ALIGN = 65536
PAGE_ALIGN_MIN = 1 << 20
"""Tensors of at least 1 MiB start on a 64 KiB boundary so onnxruntime can memory-map them."""

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
}


class DataFile:
    """Appends tensor bytes to `model.onnx_data` as they are produced and returns TensorProtos that point into it.

    A tensor's size is known before its first byte (`add_chunks` takes dtype and shape), so its offset and alignment
    are fixed up front and its chunks go straight to the file: no tensor is ever held whole, nor copied to bytes. A
    write that fails part way leaves the file unusable, and every later call says so."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        self.f: BinaryIO = open(path, "wb")
        self.offset = 0
        self._broken: str | None = None

    def add(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr)
        return self.add_chunks(name, arr.dtype, arr.shape, [arr])

    def add_chunks(self, name: str, dtype: Any, shape: tuple[int, ...] | list[int],
                   chunks: Iterable[np.ndarray]) -> TensorProto:
        """One tensor of `dtype` and `shape` whose bytes arrive as `chunks` in C order (any split)."""
        if self._broken:
            raise ValueError(f"{self.name}: cannot add {name!r}: {self._broken}")
        if self.f.closed:
            raise ValueError(f"{self.name}: cannot add {name!r}: the file is closed")
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        align = PAGE_ALIGN if nbytes >= PAGE_ALIGN_MIN else 64
        pad = (-self.offset) % align
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        t = TensorProto(name=name, data_type=NP_TO_ONNX[dtype], dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.name), ("offset", str(self.offset)), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self._broken = f"the write of {name!r} did not finish"
        written = 0
        for c in chunks:
            if c.dtype != dtype:
                raise ValueError(f"{name}: chunk of {c.dtype}, expected {dtype}")
            self.f.write(np.ascontiguousarray(c).reshape(-1).view(np.uint8).data)
            written += c.nbytes
        if written != nbytes:
            self._broken = f"{name!r} got {written} bytes, expected {nbytes}"
            raise ValueError(f"{self.name}: {self._broken}")
        self._broken = None
        self.offset += nbytes
        return t

    def close(self) -> None:
        if not self.f.closed:
            self.f.flush()
            self.f.close()


class GraphBuilder:
    """Nodes, graph inputs/outputs and external initializers; `model()` assembles the ModelProto."""

    def __init__(self, data: DataFile):
        self.data = data
        self.nodes: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.initializers: list[TensorProto] = []
        self.init_bytes: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self._n = 0

    def init(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes <= INLINE_MAX_BYTES:
            t = helper.make_tensor(name, NP_TO_ONNX[arr.dtype], list(arr.shape), arr.tobytes(), raw=True)
        else:
            t = self.data.add(name, arr)
        self.initializers.append(t)
        self.init_bytes[name] = arr.nbytes
        return name

    def init_chunks(self, name: str, dtype: Any, shape: tuple[int, ...] | list[int],
                    chunks: Iterable[np.ndarray]) -> str:
        """An initializer streamed chunk by chunk into the data file (a tiny one is gathered and kept inline)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes <= INLINE_MAX_BYTES:
            arr = np.concatenate([np.ravel(c) for c in chunks])
            if arr.dtype != dtype:
                raise ValueError(f"{name}: chunks of {arr.dtype}, expected {dtype}")
            return self.init(name, arr.reshape(shape))
        self.initializers.append(self.data.add_chunks(name, dtype, shape, chunks))
        self.init_bytes[name] = nbytes
        return name

    def alias(self, name: str, of: str, shape: list[int] | None = None) -> str:
        """A second initializer over the stored bytes of `of` (viewed with `shape`, default its own); nothing is written.

        onnxruntime maps each external initializer on its own, so a kernel that prepacks `of` and releases it leaves
        this view mapped but untouched: only the pages actually read (a Gather's rows) become resident. A tensor
        stored inside model.onnx has no pages to spare and is shared as it is (`of` is returned)."""
        src = next(t for t in self.initializers if t.name == of)
        if src.data_location != TensorProto.EXTERNAL:
            return of
        if shape is not None and int(np.prod(shape)) != int(np.prod(list(src.dims))):
            raise ValueError(f"cannot view {of!r} {list(src.dims)} as {shape}: sizes differ")
        t = TensorProto()
        t.CopyFrom(src)
        t.name = name
        if shape is not None:
            del t.dims[:]
            t.dims.extend(shape)
        self.initializers.append(t)
        self.init_bytes[name] = 0
        return name

    def const_i64(self, values: list[int] | int) -> str:
        scalar = isinstance(values, int)
        key = ("i64", scalar, tuple([values] if scalar else values))
        if key not in self._consts:
            arr = np.array(values, dtype=np.int64)
            self._consts[key] = self.init(f"/const/i64/{'s' if scalar else ''}{list(key[2])}".replace(" ", ""), arr)
        return self._consts[key]

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
             outputs: list[str] | None = None, **attrs: Any) -> list[str]:
        outs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs: Any) -> str:
        return self.node(op, inputs, name, 1, domain, **attrs)[0]

    def add_input(self, name: str, elem: int, shape: list[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def add_output(self, name: str, elem: int, shape: list[Any]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def model(self, graph_name: str, opset: int = 21) -> Any:
        g = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              ir_version=10, producer_name="qwen-edge")
        return m
