"""ONNX exporter: a fused, optionally block-quantized decoder graph written torch-free from safetensors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..model.artifact import write_json
from ..model.checkpoint import Checkpoint
from ..errors import QwenEdgeError
from .registry import ExportResult, register_exporter
from .onnx_decoder import DecoderBuilder, QuantPlan
from .onnx_genai import genai_config
from .onnx_lora import adapter_tensors, lora_linears
from ..formats.onnx_adapter import ADAPTER_FILE, write_adapter_file
from ..formats.onnx import DATA_FILE, MODEL_FILE
from ..formats.onnx_graph import DataFile, GraphBuilder
from ..formats.quants import quants_of

QUANTS = quants_of("onnx")
OPTIONS = {
    "block_size": "MatMulNBits block size along K (power of two >= 16; default the target's onnx_block_size, else 32)",
    "symmetric": "symmetric blocks without zero points (default true)",
    "lm_head_bits": "LM head: 4, 8 or 16 (float); default the target's onnx_lm_head_bits, else 8 for int4/int8",
    "lm_head_block_size": "LM head block size along K (default 128 for an int8 head, else block_size)",
    "quantize_embeddings": "embeddings as GatherBlockQuantized (default true for int4/int8)",
    "accuracy_level": "MatMulNBits accuracy_level (default: the target's, 4 = int8 compute on CPU; "
                      "0 is about 25x slower to decode on CPU)",
    "context_length": "rotary cache length (default: the model's max_position_embeddings)",
    "genai_max_length": "onnxruntime-genai search.max_length (default min(context, 4096))",
    "imatrix": "int4/int8: importance matrix ('auto' or a llama.cpp imatrix file); each linear's block scales are "
               "searched to minimize the importance-weighted error (symmetric blocks; same graph)",
    "calibration_text": "with imatrix=auto, awq or gptq: the calibration text (.txt or .json; default the shipped one)",
    "awq": "int4/int8: activation-aware per-channel scales folded into the preceding norm/projection before "
           "quantization (export/awq.py; the float model is unchanged, the graph the same)",
    "gptq": "int4/int8: GPTQ error compensation over the calibration inputs' Hessian (export/gptq.py; symmetric "
            "blocks, same graph; with imatrix, each block's scale is the importance-weighted one)",
    "kv_dtype": "KV cache dtype, float16 or float32 (default float16 for fp16 exports and memory-capped targets such "
                "as arm64-mobile, else float32); the attention runs in this dtype",
}
KV_DTYPES = {"float16": np.float16, "float32": np.float32}
BLOCK_SIZES = (16, 32, 64, 128, 256)
OPTION_VALUES: dict[str, tuple[int, ...]] = {"accuracy_level": (0, 1, 2, 3, 4), "lm_head_bits": (4, 8, 16),
                                             "block_size": BLOCK_SIZES, "lm_head_block_size": BLOCK_SIZES}
"""The values each integer option may take: checked here and, before an export, by recipe validation."""


def default_kv_dtype(quant: str, target: Any) -> str:
    """float16 for an fp16 export (its whole graph is fp16) and for a target with a memory cap (arm64-mobile): half
    the cache (Qwen3-0.6B at 4096 tokens: 448 instead of 896 MiB) decides whether a model fits there. float32
    otherwise: onnxruntime's CPU GroupQueryAttention has no float32-query/float16-cache kernel, so the attention runs
    in float16 between Casts, and on x86-64 that decodes about 10% slower from 1K tokens of context on
    (benchmarks/RESULTS.md, "KV-cache memory")."""
    if quant == "fp16" or (target is not None and target.get("memory_cap_mb")):
        return "float16"
    return "float32"


__all__ = ["export_onnx", "MODEL_FILE", "DATA_FILE", "QUANTS"]


def _bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise QwenEdgeError(f"onnx option {key}={v!r}: expected true or false")


def _int(v: Any, key: str) -> int:
    try:
        n = int(v)
        if isinstance(v, bool) or (isinstance(v, float) and n != v):
            raise ValueError
    except (TypeError, ValueError):
        raise QwenEdgeError(f"onnx option {key}={v!r}: expected an integer") from None
    allowed = OPTION_VALUES.get(key)
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
    plan = QuantPlan(quant=quant, accuracy_level=_int(level, "accuracy_level"))
    if quant == "fp16":
        plan.float_dtype = np.float16
    kv = options.get("kv_dtype") or default_kv_dtype(quant, target)
    if kv not in KV_DTYPES:
        raise QwenEdgeError(f"onnx option kv_dtype={kv!r}: expected one of {', '.join(KV_DTYPES)}")
    plan.kv_dtype = KV_DTYPES[kv]
    if quant in ("int4", "int8"):
        bits = 4 if quant == "int4" else 8
        plan.linear_bits = bits
        # the target profile's defaults (a CPU whose decode is bound by memory reads may pick smaller weights)
        default_head = (target.get("onnx_lm_head_bits") if target is not None else None) or 8
        default_block = (target.get("onnx_block_size") if target is not None else None) or 32
        head = _int(options.get("lm_head_bits", default_head), "lm_head_bits")
        plan.lm_head_bits = None if head == 16 else head
        plan.quantize_embeddings = _bool(options.get("quantize_embeddings", True), "quantize_embeddings")
        plan.block_size = _int(options.get("block_size", default_block), "block_size")
        if "lm_head_block_size" in options:  # else the builder picks (see DecoderBuilder.head_block)
            plan.lm_head_block_size = _int(options["lm_head_block_size"], "lm_head_block_size")
        plan.symmetric = _bool(options.get("symmetric", True), "symmetric")
    else:
        for key in ("block_size", "symmetric", "lm_head_bits", "lm_head_block_size", "quantize_embeddings"):
            if key in options:
                raise QwenEdgeError(f"onnx option {key} applies to int4/int8, not {quant}")
    return plan


def _importance(ckpt: Checkpoint, quant: str, plan: QuantPlan, options: dict[str, Any]
                ) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """Options imatrix / calibration_text / awq / gptq: the checkpoint to export (scaled by awq), the plan's
    importance vectors by checkpoint name (the matrix is keyed by GGUF names, as llama.cpp's files are) and GPTQ
    factors, and the manifest's records of the three."""
    from ..families import family_of
    from .awq import calibrated, onnx_quantizer
    from .gptq import gptq_option, hessians

    refuse = tuple(q for q in QUANTS if q not in ("int4", "int8"))
    gptq, opts = gptq_option("onnx", quant, options, refuse)
    for key in ("imatrix", "awq", "gptq"):
        if options.get(key) not in (None, False, "false") and quant not in refuse and not plan.symmetric:
            raise QwenEdgeError(f"onnx option {key}: the calibrated search makes symmetric blocks (drop "
                                "symmetric=false)")
    ckpt, values, record, awq_record = calibrated(ckpt, "onnx", quant, opts, refuse,
                                                  lambda: onnx_quantizer(plan.linear_bits or 4, plan.block_size))
    if values is not None:
        hf = {t.gguf: t.hf for t in family_of(ckpt.arch).tensor_map(ckpt.arch)}
        plan.importance = {hf[name]: v for name, v in values.items()}
        record = {**record, "method": "importance-weighted scale search per block (onnx_imatrix)"}
    if gptq:
        plan.hessian, gptq_record = hessians(ckpt, gptq["text"])
        return ckpt, record, awq_record, gptq_record
    return ckpt, record, awq_record, None


HF_CONFIG = "config.json"


def hf_config(ckpt: Checkpoint, context_length: int) -> dict[str, Any]:
    """The source's config.json for Hugging Face tools (optimum's ORTModelForCausalLM, transformers' generate and
    pipeline): what identifies the model (model_type, architectures, heads, head_dim, layers), with use_cache on (the
    graph has a KV cache), `rope_theta` spelled out (transformers 5 writes it inside rope_parameters only, which
    transformers 4.x, optimum's pin, does not read), max_position_embeddings capped at the rotary cache the graph
    holds, and no quantization_config (the graph's own quantization is not one transformers would load)."""
    a = ckpt.arch
    cfg = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    cfg.update(use_cache=True, rope_theta=a.rope_theta, head_dim=a.head_dim, num_key_value_heads=a.num_kv_heads,
               max_position_embeddings=context_length)
    return cfg


@register_exporter("onnx", quants=QUANTS)
def export_onnx(ckpt: Checkpoint, out: Path, quant: str, *, target: Any = None, options: dict[str, Any],
                tokenizer: dict[str, Any], adapters: Sequence[Any] = ()) -> ExportResult:
    """Write model.onnx + model.onnx_data + genai_config.json + config.json into `out` (the artifact's temporary
    directory).

    `adapters` (bound PEFT adapters, `--adapter-mode separate`): the graph gets LoRA inputs on every linear they
    touch (onnx_lora) and each adapter is written beside it as an onnxruntime `.onnx_adapter` file; the base
    weights stay as they are. Without adapters the graph is the plain one, byte for byte."""
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
    ckpt, imatrix_record, awq_record, gptq_record = _importance(ckpt, quant, plan, options)
    data = DataFile(out / DATA_FILE)
    try:
        g = GraphBuilder(data)
        lora = lora_linears(ckpt, adapters) if adapters else None
        rec = DecoderBuilder(ckpt, g, plan, ctx, lora).build()
    finally:
        data.close()
    model = g.model(f"qwen-edge {a.family} decoder ({quant})")
    import onnx

    onnx.save_model(model, str(out / MODEL_FILE))
    device = target.get("device", "cpu") if target is not None else "cpu"
    write_json(out / "genai_config.json", genai_config(
        ckpt, model_file=MODEL_FILE, context_length=ctx, tokenizer=tokenizer, device=device,
        max_length=options.get("genai_max_length") or (target.get("max_context") if target is not None else None),
        spin=target.get("spin", "auto") if target is not None else "auto",
        threads=target.get("threads", "auto") if target is not None else "auto"))
    write_json(out / HF_CONFIG, hf_config(ckpt, ctx))
    extra_adapters = []
    for i, ad in enumerate(adapters):
        file = ADAPTER_FILE if len(adapters) == 1 else ADAPTER_FILE.replace(".onnx_adapter", f"-{i + 1}.onnx_adapter")
        write_adapter_file(adapter_tensors(ad, lora or {}, plan.float_dtype), out / file)
        extra_adapters.append({**ad.record("separate", file), "scale_in_lora_b": True})
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
    if imatrix_record is not None:
        quantization["imatrix"] = imatrix_record
    if awq_record is not None:
        quantization["awq"] = awq_record
    if gptq_record is not None:
        quantization["gptq"] = gptq_record
    facts: dict[str, Any] = {"data_file": DATA_FILE, "opset": 21, "io_dtype": plan.float_name,
                             "kv_dtype": np.dtype(plan.kv).name,
                             "rotary_cache_tokens": ctx, "optional_inputs": ["logits_to_keep"],
                             "ops": dict(Counter(n.op_type for n in model.graph.node))}
    extra: dict[str, Any] = {"onnx": facts}
    if adapters:
        facts["lora_linears"] = len(lora or {})  # each with optional inputs <linear>.lora_A/B.weight
        extra["adapters"] = extra_adapters
    return ExportResult(model_file=MODEL_FILE, quantization=quantization, context_length=ctx, extra=extra)
