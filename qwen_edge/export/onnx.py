"""ONNX exporter: a fused, optionally block-quantized decoder graph written torch-free from safetensors."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import write_json
from ..checkpoint import Checkpoint
from ..errors import QwenEdgeError, first_line
from . import ExportResult, register_exporter
from .onnx_decoder import DecoderBuilder, QuantPlan
from .onnx_genai import genai_config
from .onnx_graph import DataFile, GraphBuilder

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
QUANTS = ("fp32", "fp16", "int8", "int4")
OPTIONS = {
    "block_size": "MatMulNBits block size along K (power of two >= 16; default 32)",
    "symmetric": "symmetric blocks without zero points (default true)",
    "lm_head_bits": "LM head: 4, 8 or 16 (float); default 8 for int4/int8",
    "lm_head_block_size": "LM head block size along K (default 128 for an int8 head, else block_size)",
    "quantize_embeddings": "embeddings as GatherBlockQuantized (default true for int4/int8)",
    "accuracy_level": "MatMulNBits accuracy_level (default: the target's, 4 = int8 compute on CPU; "
                      "0 is about 25x slower to decode on CPU)",
    "context_length": "rotary cache length (default: the model's max_position_embeddings)",
    "genai_max_length": "onnxruntime-genai search.max_length (default min(context, 4096))",
    "kv_dtype": "KV cache dtype, float16 or float32 (default float16 for fp16 exports and memory-capped targets such "
                "as arm64-mobile, else float32); the attention runs in this dtype",
}
KV_DTYPES = {"float16": np.float16, "float32": np.float32}


def default_kv_dtype(quant: str, target: Any) -> str:
    """float16 for an fp16 export (its whole graph is fp16) and for a target with a memory cap (arm64-mobile): half
    the cache (Qwen3-0.6B at 4096 tokens: 448 instead of 896 MiB) decides whether a model fits there. float32
    otherwise: onnxruntime's CPU GroupQueryAttention has no float32-query/float16-cache kernel, so the attention runs
    in float16 between Casts, and on x86-64 that decodes about 10% slower from 1K tokens of context on
    (benchmarks/RESULTS.md, "KV-cache memory")."""
    if quant == "fp16" or (target is not None and target.get("memory_cap_mb")):
        return "float16"
    return "float32"


__all__ = ["export_onnx", "onnx_file_info", "MODEL_FILE", "DATA_FILE", "QUANTS"]


def _bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise QwenEdgeError(f"onnx option {key}={v!r}: expected true or false")


def _int(v: Any, key: str, allowed: tuple[int, ...] | None = None) -> int:
    try:
        n = int(v)
        if isinstance(v, bool) or (isinstance(v, float) and n != v):
            raise ValueError
    except (TypeError, ValueError):
        raise QwenEdgeError(f"onnx option {key}={v!r}: expected an integer") from None
    if allowed is not None and n not in allowed:
        raise QwenEdgeError(f"onnx option {key}={n}: expected one of {', '.join(map(str, allowed))}")
    return n


def make_plan(quant: str, target: Any, options: dict[str, Any]) -> QuantPlan:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise QwenEdgeError(f"unknown onnx option {unknown[0]!r} (known: {', '.join(OPTIONS)})")
    level = options.get("accuracy_level")
    if level is None:
        level = target.get("accuracy_level", 4) if target is not None else 4
    plan = QuantPlan(quant=quant, accuracy_level=_int(level, "accuracy_level", (0, 1, 2, 3, 4)))
    if quant == "fp16":
        plan.float_dtype = np.float16
    kv = options.get("kv_dtype") or default_kv_dtype(quant, target)
    if kv not in KV_DTYPES:
        raise QwenEdgeError(f"onnx option kv_dtype={kv!r}: expected one of {', '.join(KV_DTYPES)}")
    plan.kv_dtype = KV_DTYPES[kv]
    if quant in ("int4", "int8"):
        bits = 4 if quant == "int4" else 8
        plan.linear_bits = bits
        head = _int(options.get("lm_head_bits", 8), "lm_head_bits", (4, 8, 16))
        plan.lm_head_bits = None if head == 16 else head
        plan.quantize_embeddings = _bool(options.get("quantize_embeddings", True), "quantize_embeddings")
        plan.block_size = _int(options.get("block_size", 32), "block_size", (16, 32, 64, 128, 256))
        if "lm_head_block_size" in options:  # else the builder picks (see DecoderBuilder.head_block)
            plan.lm_head_block_size = _int(options["lm_head_block_size"], "lm_head_block_size",
                                           (16, 32, 64, 128, 256))
        plan.symmetric = _bool(options.get("symmetric", True), "symmetric")
    else:
        for key in ("block_size", "symmetric", "lm_head_bits", "lm_head_block_size", "quantize_embeddings"):
            if key in options:
                raise QwenEdgeError(f"onnx option {key} applies to int4/int8, not {quant}")
    return plan


@register_exporter("onnx", quants=QUANTS)
def export_onnx(ckpt: Checkpoint, out: Path, quant: str, *, target: Any = None, options: dict[str, Any],
                tokenizer: dict[str, Any]) -> ExportResult:
    """Write model.onnx + model.onnx.data + genai_config.json into `out` (the artifact's temporary directory)."""
    if quant not in QUANTS:
        raise QwenEdgeError(f"onnx has no quantization {quant!r} (available: {', '.join(QUANTS)})")
    options = dict(options or {})
    plan = make_plan(quant, target, options)
    a = ckpt.arch
    ctx = _int(options.get("context_length", a.max_position_embeddings), "context_length")
    if not 0 < ctx <= a.max_position_embeddings:
        raise QwenEdgeError(f"onnx option context_length={ctx}: must be in 1..{a.max_position_embeddings}")
    if a.head_dim % 16:
        raise QwenEdgeError(f"{ckpt.path.name}: head_dim {a.head_dim} is not a multiple of 16 "
                            "(onnxruntime GroupQueryAttention rotary needs it)")
    data = DataFile(out / DATA_FILE)
    try:
        g = GraphBuilder(data)
        rec = DecoderBuilder(ckpt, g, plan, ctx).build()
    finally:
        data.close()
    model = g.model(f"qwen-edge {a.family} decoder ({quant})")
    import onnx

    onnx.save_model(model, str(out / MODEL_FILE))
    device = target.get("device", "cpu") if target is not None else "cpu"
    write_json(out / "genai_config.json", genai_config(
        ckpt, model_file=MODEL_FILE, context_length=ctx, tokenizer=tokenizer, device=device,
        max_length=options.get("genai_max_length") or (target.get("max_context") if target is not None else None)))
    params = a.parameter_count()
    quantization = {
        "requested": quant,
        "tensor_types": rec.tensor_types,
        "type_counts": dict(Counter(rec.tensor_types.values())),
        "bits_per_weight": round(8 * rec.weight_bytes / params, 4),
        "parameters": params,
        "weight_bytes": rec.weight_bytes,
        "block_size": plan.block_size if plan.linear_bits else None,
        "symmetric": plan.symmetric if plan.linear_bits else None,
        "accuracy_level": plan.accuracy_level if plan.linear_bits else None,
        "lm_head": f"int{plan.lm_head_bits}" if plan.lm_head_bits else plan.float_name,
        "lm_head_block_size": plan.lm_head_block_size if plan.lm_head_bits else None,
        "embedding": rec.embedding,
    }
    extra = {"onnx": {"data_file": DATA_FILE, "opset": 21, "io_dtype": plan.float_name,
                      "kv_dtype": np.dtype(plan.kv).name,
                      "rotary_cache_tokens": ctx, "optional_inputs": ["logits_to_keep"],
                      "ops": dict(Counter(n.op_type for n in model.graph.node))}}
    return ExportResult(model_file=MODEL_FILE, quantization=quantization, context_length=ctx, extra=extra)


# --- inspect --------------------------------------------------------------------------------------------------
_ELEM = {1: "float32", 10: "float16", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 16: "bfloat16", 9: "bool"}


def load_onnx_proto(path: str | os.PathLike):
    """The ModelProto without its external data; QwenEdgeError when the file is not a parseable ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise QwenEdgeError(f"{p}: no such file")
    try:
        m = onnx.load_model(str(p), load_external_data=False)
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
