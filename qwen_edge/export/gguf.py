"""GGUF exporter: a checkpoint through its family's tensor map into a GGUF file, any quantization.

Tensors stream from the memory-mapped checkpoint; the direct types are written with gguf-py's quantizers, the
K/I-quants by llama.cpp's own quantizer from a 16-bit intermediate file (`llama_lib.llama_quantize`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..model.checkpoint import Checkpoint
from ..errors import QwenEdgeError
from ..families import Arch, family_of, size_label
from ..formats.gguf import (MODEL_FILE, DecoderKV, GGMLQuantizationType as T, GGUFFile, PlannedTensor,
                            check_gguf_file, file_type_name, quantize, type_counts, write_gguf, write_lora_gguf)
from ..formats.quants import QUANTS as ALL_QUANTS, quants_of
from ..model.safetensors_io import release_pages, to_float32
from .registry import ExportResult, register_exporter
from .gguf_vocab import stop_texts, vocab_kv, write_modelfile
from .awq import calibrated, ggml_quantizer

__all__ = ["export_gguf", "QUANTS", "MODEL_FILE", "tensor_names", "write_adapter_gguf"]

QUANTS = quants_of("gguf")
DIRECT = tuple(q for q in QUANTS if ALL_QUANTS[q].direct)
"""Written here with gguf-py (bit-exact with ggml's reference quantizers); the rest by llama.cpp's quantizer."""
BASE_TYPES = {q: ALL_QUANTS[q].gguf_type for q in QUANTS if q not in DIRECT}
"""Quantized by llama.cpp itself (its per-tensor mixture rules): the type each gives 2-D weights."""
INTERMEDIATE = {"bf16": T.BF16, "f16": T.F16, "f32": T.F32}
"""The 16/32-bit file llama.cpp's quantizer reads, by the `intermediate` option's name."""
CHUNK_BYTES = 32 << 20
"""Rows are converted in slices of about this many float32 bytes, so peak memory stays far below one tensor."""
KNOWN_OPTIONS = ("threads", "intermediate", "imatrix", "calibration_text", "awq", "gptq")
NO_IMATRIX = ("f32", "f16", "bf16", "q8_0")
"""Types ggml quantizes without an importance matrix (float, or 8 bits per weight: nothing to weigh)."""


def _planned(gguf_name: str, hf_name: str, shape: tuple[int, ...], t: T) -> tuple[PlannedTensor, str]:
    return PlannedTensor(gguf_name, shape, t), hf_name


def _weight_type(quant: str) -> T:
    t = ALL_QUANTS[quant].gguf_type
    assert t is not None
    return t


def tensor_names(arch: Arch) -> list[tuple[str, str]]:
    """(gguf name, HF name) in llama.cpp's order, from the family's tensor map."""
    return [(t.gguf, t.hf) for t in family_of(arch).tensor_map(arch)]


def _direct_type(quant: str, gname: str, shape: tuple[int, ...], arch: Arch) -> T:
    if len(shape) == 1 or quant == "f32":
        return T.F32
    want = _weight_type(quant)
    if quant == "q4_0" and (gname == "output.weight" or (gname == "token_embd.weight" and arch.tie_word_embeddings)):
        want = T.Q8_0  # llama.cpp keeps the output head above 4 bits (Q6_K); gguf-py writes Q8_0 exactly
    block = PlannedTensor(gname, shape, want).block_size
    return want if shape[-1] % block == 0 else T.F16


def _intermediate_type(ckpt: Checkpoint, names: list[tuple[str, str]], option: str | None) -> T:
    if option:
        if option not in INTERMEDIATE:
            raise QwenEdgeError(f"gguf option intermediate={option!r} (choose bf16, f16 or f32)")
        return INTERMEDIATE[option]
    dtypes = {ckpt.tensor_info(hf).dtype for _, hf in names if len(ckpt.tensor_info(hf).shape) == 2}
    if dtypes == {"BF16"}:
        return T.BF16  # what llama.cpp's converter (--outtype auto) writes for a bf16 checkpoint: no rounding
    return T.F16 if dtypes == {"F16"} else T.F32


def _decoder_kv(ckpt: Checkpoint, file_type: int) -> DecoderKV:
    a = ckpt.arch
    name = str(ckpt.config.get("_name_or_path") or ckpt.path.name).rstrip("/").split("/")[-1] or "model"
    head_dim = a.head_dim if family_of(a).explicit_head_dim or a.head_dim * a.num_heads != a.hidden_size else None
    return DecoderKV(name=name, size_label=size_label(a), file_type=file_type,
                     context_length=a.max_position_embeddings, embedding_length=a.hidden_size,
                     block_count=a.num_layers, feed_forward_length=a.intermediate_size, head_count=a.num_heads,
                     head_count_kv=a.num_kv_heads, head_dim=head_dim, rope_freq_base=a.rope_theta,
                     rms_norm_eps=a.rms_norm_eps)


def _tensor_writer(ckpt: Checkpoint, sources: dict[str, str]):
    def write(f: BinaryIO, t: PlannedTensor) -> None:
        hf = sources[t.name]
        raw = ckpt.raw(hf)
        dtype = ckpt.tensor_info(hf).dtype
        if raw.ndim == 1:
            raw = raw.reshape(1, -1)
        rows_per_chunk = max(1, CHUNK_BYTES // (4 * raw.shape[-1]))
        for r0 in range(0, raw.shape[0], rows_per_chunk):
            part = raw[r0:r0 + rows_per_chunk]
            if t.type == T.BF16 and dtype == "BF16":
                data = np.ascontiguousarray(part)  # stored bf16 bits, copied as they are
            else:
                x = to_float32(part, dtype)
                if t.type == T.F32:
                    data = x
                elif t.type == T.F16:
                    data = x.astype(np.float16)
                    if not np.isfinite(data).all() and np.isfinite(x).all():
                        raise QwenEdgeError(f"{ckpt.path.name}: tensor {hf!r} overflows float16; export bf16 or f32")
                else:
                    data = quantize(x, t.type)
            data.tofile(f)
        release_pages(raw)
    return write


def _write(ckpt: Checkpoint, path: Path, plan: list[tuple[PlannedTensor, str]], file_type: int, out: Path,
           tok: dict[str, Any]) -> None:
    """Header, metadata and tensor table first, then each tensor streamed slice by slice from the checkpoint."""
    from ..log import progress

    fam = family_of(ckpt.arch)
    write_gguf(path, fam.gguf_arch_name, _decoder_kv(ckpt, file_type),
               vocab_kv(out, ckpt.arch.vocab_size, tok, fam.gguf_pre), [t for t, _ in plan],
               _tensor_writer(ckpt, {t.name: hf for t, hf in plan}),
               lambda ts: progress(ts, desc="write GGUF", unit="tensor"))


def _threads(target: Any, options: dict[str, Any]) -> int:
    n = options.get("threads")
    if n is None and target is not None:
        n = target.get("threads")
    if isinstance(n, int) and n > 0:
        return n
    from ..device.targets import physical_cores

    return physical_cores()


def quantization_report(g: GGUFFile, quant: str, direct: bool | None = None) -> dict[str, Any]:
    """Per-tensor types, counts, bits per weight and every 2-D tensor that did not get the requested type."""
    base = _weight_type(quant)
    block = PlannedTensor("", (1,), base).block_size
    fallbacks: dict[str, dict[str, str]] = {}
    for t in g.tensors:
        if len(t.shape) < 2 or t.type == base:
            continue
        if t.shape[0] % block:
            reason = f"row length {t.shape[0]} is not a multiple of {block}"
        elif quant == "q4_0" and direct is not False:
            reason = "output head kept at 8 bits"
        else:
            reason = f"llama.cpp {quant} mixture"
        fallbacks[t.name] = {"type": t.type_name, "reason": reason}
    return {
        "requested": quant,
        "base_type": base.name,
        "file_type": file_type_name(g.kv.get("general.file_type")),
        "method": "gguf-py" if (quant in DIRECT if direct is None else direct) else "llama.cpp llama_model_quantize",
        "tensor_types": {t.name: t.type_name for t in g.tensors},
        "type_counts": type_counts(g),
        "bits_per_weight": round(g.bits_per_weight(), 4),
        "parameters": g.n_parameters(),
        "tensor_bytes": g.tensor_bytes(),
        "fallbacks": fallbacks,
    }


@register_exporter("gguf", quants=QUANTS)
def export_gguf(ckpt: Checkpoint, out: Path, quant: str, *, target: Any = None, options: dict[str, Any],
                tokenizer: dict[str, Any]) -> ExportResult:
    """Write `out/model.gguf` (+ `out/Modelfile`) for `quant`; see QUANTS."""
    if quant not in QUANTS:
        raise QwenEdgeError(f"gguf has no quantization {quant!r} (available: {', '.join(QUANTS)})")
    unknown = sorted(set(options) - set(KNOWN_OPTIONS))
    if unknown:
        raise QwenEdgeError(f"unknown gguf option {unknown[0]!r} (known: {', '.join(KNOWN_OPTIONS)})")
    out = Path(out)
    arch = ckpt.arch
    names = tensor_names(arch)
    for _, hf in names:
        ckpt.tensor_info(hf)  # a missing tensor is a one-line error before anything is written
    dst = out / MODEL_FILE
    from .gptq import gptq_option

    gptq, options = gptq_option("gguf", quant, options, NO_IMATRIX)
    ckpt, imatrix, imatrix_record, awq_record = calibrated(ckpt, "gguf", quant, options, NO_IMATRIX,
                                                           lambda: ggml_quantizer(_weight_type(quant)))
    if quant in DIRECT and imatrix is None:
        plan = [_planned(g, hf, ckpt.tensor_info(hf).shape, _direct_type(quant, g, ckpt.tensor_info(hf).shape, arch))
                for g, hf in names]
        _write(ckpt, dst, plan, int(ALL_QUANTS[quant].file_type), out, tokenizer)
    else:
        from ..device.llama_lib import llama_quantize

        inter = _intermediate_type(ckpt, names, options.get("intermediate"))
        plan = [_planned(g, hf, ckpt.tensor_info(hf).shape, inter if len(ckpt.tensor_info(hf).shape) == 2 else T.F32)
                for g, hf in names]
        tmp = out / f".{MODEL_FILE}.{inter.name.lower()}.tmp"
        try:
            _write(ckpt, tmp, plan, int(ALL_QUANTS[inter.name.lower()].file_type), out, tokenizer)
            # q4_0 through llama.cpp (with a matrix): the output head at Q8_0 as the direct writer has it (llama.cpp
            # would give it Q6_K), so a calibrated q4_0 differs from the plain one only by the matrix
            llama_quantize(tmp, dst, int(ALL_QUANTS[quant].file_type), quant, _threads(target, options),
                           imatrix=imatrix, output_type=int(T.Q8_0) if quant in DIRECT else None)
        finally:
            tmp.unlink(missing_ok=True)
    gptq_record = None
    if gptq:
        from .gptq import hessians
        from .gptq_gguf import compensate_file

        factors, gptq_record = hessians(ckpt, gptq["text"])
        gguf_of = {hf: g for g, hf in names}
        gptq_record.update(compensate_file(dst, ckpt, {gguf_of[hf]: u for hf, u in factors.items()}, imatrix))
    g = check_gguf_file(dst)
    report = quantization_report(g, quant, direct=quant in DIRECT and imatrix is None)
    if gptq_record is not None:
        report["gptq"] = gptq_record
    if imatrix_record is not None:
        report["imatrix"] = imatrix_record
    if awq_record is not None:
        report["awq"] = awq_record
    write_modelfile(out, MODEL_FILE, stop_texts(out, list(tokenizer.get("stop_ids", []))))
    extra = {"gguf": {"architecture": g.architecture, "file_type": report["file_type"],
                      "intermediate": None if report["method"] == "gguf-py" else inter.name,
                      "llama_cpp": _llama_cpp_version() if report["method"] != "gguf-py" else None}}
    return ExportResult(model_file=MODEL_FILE, quantization=report, context_length=arch.max_position_embeddings,
                        extra=extra)


def write_adapter_gguf(adapter: Any, arch: Arch, path: Path) -> bool:
    """Write a bound `qwen_edge.model.adapters.Adapter` as a llama.cpp LoRA GGUF for the base `arch`; returns whether
    per-module scales were folded into lora_b.

    llama.cpp applies `scale * alpha / rank` per pair with one alpha for the file; PEFT's scale per module is
    alpha/rank, alpha/sqrt(rank) with rsLoRA, or an alpha_pattern's alpha over the rank. Where they differ, lora_b is
    multiplied by the module's scale * rank / alpha, so llama.cpp's product is PEFT's (an adapter scale still
    multiplies the whole update)."""
    names = tensor_names(arch)
    gguf_of = {hf: g for g, hf in names}
    order = {hf: i for i, (_, hf) in enumerate(names)}
    alpha = float(adapter.alpha)
    baked = False

    def tensors():
        nonlocal baked
        for weight, m in sorted(adapter.modules.items(), key=lambda kv: order[kv[0]]):
            b = adapter.tensor(m.b)
            llama_scale = alpha / m.rank if alpha else 1.0
            factor = m.scale / llama_scale
            if abs(factor - 1.0) > 1e-7:
                b = b * np.float32(factor)
                baked = True
            yield f"{gguf_of[weight]}.lora_a", adapter.tensor(m.a)
            yield f"{gguf_of[weight]}.lora_b", b

    write_lora_gguf(path, family_of(arch).gguf_arch_name, Path(str(adapter.source.spec)).name or "adapter", alpha,
                    tensors())
    return baked


def _llama_cpp_version() -> str | None:
    try:
        import llama_cpp

        return str(llama_cpp.__version__)
    except Exception:
        return None
