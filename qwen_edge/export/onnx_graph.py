"""A small ONNX graph builder whose initializers stream into one external-data file as they are made."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

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
    """Appends tensor bytes to `model.onnx.data` and returns TensorProtos that point into it."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        self.f: BinaryIO = open(path, "wb")
        self.offset = 0

    def add(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        align = PAGE_ALIGN if len(data) >= PAGE_ALIGN_MIN else 64
        pad = (-self.offset) % align
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        t = TensorProto(name=name, data_type=NP_TO_ONNX[arr.dtype], dims=list(arr.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.f.write(data)
        self.offset += len(data)
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
