"""ONNX file I/O: load a model without its data, check external data, weight byte ranges and uses, describe."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QwenEdgeError, first_line

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
"""The weights beside model.onnx: `<model file>_data`, the name optimum fetches with a hub-hosted model.onnx (the
graph records it, so onnxruntime and onnxruntime-genai read any name)."""
ROTARY_CACHES = ("cos_cache", "sin_cache")

_ELEM = {1: "float32", 10: "float16", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 16: "bfloat16", 9: "bool"}
"""ONNX TensorProto.DataType numbers -> names (numpy's, except bfloat16, which numpy lacks)."""


def elem_numpy_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX tensor element type; QwenEdgeError for one numpy has no dtype for."""
    name = _ELEM.get(elem_type)
    if name is None or name == "bfloat16":
        raise QwenEdgeError(f"ONNX element type {elem_type} ({name or 'unknown'}) has no numpy dtype here")
    return np.dtype("bool" if name == "bool" else name)


def load_onnx_proto(path: str | os.PathLike):
    """The ModelProto without its external data; QwenEdgeError when the file is not a parseable ONNX model.

    Parsed with the subset of ONNX's schema that qwen-edge reads (formats/onnx_proto.py), not the `onnx` package,
    whose import would cost loading an artifact more than onnxruntime's own load of the graph on some machines. The
    fields outside the subset survive as unknown fields: SerializeToString() gives onnxruntime the whole model."""
    from google.protobuf.message import DecodeError

    from .onnx_proto import parse_model

    p = Path(path)
    if not p.is_file():
        raise QwenEdgeError(f"{p}: no such file")
    try:
        m = parse_model(p.read_bytes())
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise QwenEdgeError(f"{p.name}: not a valid ONNX model ({first_line(e)})") from None
    if not m.graph.node:
        raise QwenEdgeError(f"{p.name}: not a valid ONNX model (empty graph)")
    return m


def stored_range(t) -> tuple[str, int, int] | None:
    """(file, offset, length) of an external initializer's bytes; None when it is stored inside model.onnx."""
    if t.data_location != 1:
        return None
    info = {e.key: e.value for e in t.external_data}
    return info.get("location", ""), int(info.get("offset", 0)), int(info.get("length", 0))


def weight_uses(model) -> dict[tuple[str, int, int], set[str]]:
    """How onnxruntime reads each stored byte range of the data file: a set of "gather" (the table of a
    Gather/GatherBlockQuantized: a few rows per token), "packed" (a MatMulNBits weight, scales or zero points: copied
    into the kernel's packed weight at load) and "other" (read as it is). Keyed by bytes, not names: the tied
    embedding is a view over the LM head's bytes, so that range is {"gather", "packed"}."""
    where = {t.name: r for t in model.graph.initializer if (r := stored_range(t)) is not None}
    uses: dict[tuple[str, int, int], set[str]] = {}

    def walk(graph) -> None:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in where:
                    if node.op_type in ("Gather", "GatherBlockQuantized"):
                        kind = "gather" if i == 0 else "other"
                    elif node.op_type == "MatMulNBits":
                        kind = "packed" if i in (1, 2, 3) else "other"
                    else:
                        kind = "other"
                    uses.setdefault(where[name], set()).add(kind)
            for a in node.attribute:
                if a.type == 5:  # AttributeProto.GRAPH
                    walk(a.g)

    walk(model.graph)
    return uses


def check_external_data(model, model_path: Path) -> int:
    """Every external initializer's byte range lies inside its file beside the model; returns the bytes referenced."""
    sizes: dict[str, int] = {}
    seen: set[tuple[str, int, int]] = set()
    total = 0
    for t in model.graph.initializer:
        if t.data_location != 1:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or "/" in loc or "\\" in loc or loc.startswith("."):
            raise QwenEdgeError(f"{model_path.name}: initializer {t.name!r} has an unsafe external data location {loc!r}")
        if loc not in sizes:
            f = model_path.parent / loc
            if not f.is_file():
                raise QwenEdgeError(f"{model_path.parent.name}/{loc}: missing (external data of {model_path.name})")
            sizes[loc] = f.stat().st_size
        try:
            off, length = int(info.get("offset", 0)), int(info["length"])
        except (KeyError, ValueError):
            raise QwenEdgeError(f"{model_path.name}: initializer {t.name!r} has malformed external data info") from None
        if off < 0 or length < 0 or off + length > sizes[loc]:
            raise QwenEdgeError(f"{model_path.parent.name}/{loc}: truncated ({sizes[loc]} bytes; tensor {t.name!r} "
                                f"needs bytes {off}..{off + length})")
        if (loc, off, length) not in seen:  # a view of another initializer's bytes counts once
            seen.add((loc, off, length))
            total += length
    return total


def _param_count(model) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    skip: set[str] = {"cos_cache", "sin_cache"}
    n = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            if node.input[1] not in skip:
                n += attrs.get("K", 0) * attrs.get("N", 0)
            skip.update(node.input[1:])
        elif node.op_type == "GatherBlockQuantized":
            skip.update(node.input[2:])
    for name, t in inits.items():
        if name in skip or name.startswith("/const/") or t.data_type not in (1, 10, 16):
            continue
        n += int(np.prod(list(t.dims))) if t.dims else 1
    return n


def onnx_file_info(path: str | os.PathLike) -> dict[str, Any]:
    """Facts about a bare .onnx file: opsets, op counts, initializer types, weight bits, inputs/outputs, sizes."""
    p = Path(path)
    m = load_onnx_proto(p)
    data_bytes = check_external_data(m, p)
    types: Counter[str] = Counter()
    type_bytes: Counter[str] = Counter()
    weight_bytes = 0
    stored: set[tuple[str, int, int]] = set()
    for t in m.graph.initializer:
        name = _ELEM.get(t.data_type, str(t.data_type))
        rng = stored_range(t)
        if rng is not None:  # a view of bytes already counted (the tied embedding over the LM head) adds nothing
            if rng in stored:
                continue
            stored.add(rng)
        types[name] += 1
        length = rng[2] if rng is not None else len(t.raw_data)
        type_bytes[name] += length
        if t.name not in ("cos_cache", "sin_cache") and not t.name.startswith("/const/"):
            weight_bytes += length
    nbits = Counter()
    for node in m.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: a.i for a in node.attribute}
            nbits[f"{node.op_type} int{attrs.get('bits', 4)} b{attrs.get('block_size', 0)}"] += 1
    params = _param_count(m)

    def io(vs) -> list[dict[str, Any]]:
        return [{"name": v.name, "type": _ELEM.get(v.type.tensor_type.elem_type, "?"),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in vs]

    size = p.stat().st_size
    ext_files = sorted({e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"})
    total = size + sum((p.parent / f).stat().st_size for f in ext_files)
    return {
        "format": "onnx",
        "path": str(p),
        "size_bytes": total,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "ir_version": m.ir_version,
        "producer": m.producer_name,
        "ops": dict(Counter(n.op_type for n in m.graph.node).most_common()),
        "quantized_ops": dict(nbits),
        "initializers": {"count": len(m.graph.initializer), "types": dict(types), "bytes": dict(type_bytes)},
        "external_data": {"files": ext_files, "bytes": data_bytes},
        "parameters": params,
        "bits_per_weight": round(8 * weight_bytes / params, 4) if params else None,
        "inputs": io(m.graph.input),
        "outputs": io(m.graph.output),
    }
