"""GGUF exporter: llama.cpp names and metadata, tensors streamed from the memory-mapped checkpoint, any quantization."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFValueType, GGUFWriter, LlamaFileType
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..checkpoint import Checkpoint
from ..errors import QwenEdgeError
from ..models import Arch, size_label
from ..safetensors_io import release_pages, to_float32
from . import ExportResult, register_exporter
from .gguf_file import GGUFFile, check_gguf_file, file_type_name, gguf_file_info, read_gguf, type_counts
from .gguf_quantize import llama_quantize
from .gguf_vocab import add_tokenizer, stop_texts, write_modelfile

__all__ = ["export_gguf", "check_gguf_file", "gguf_file_info", "read_gguf", "QUANTS", "MODEL_FILE"]

MODEL_FILE = "model.gguf"
DIRECT = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
"""Written here with gguf-py (bit-exact with ggml's reference quantizers)."""
BASE_TYPES = {"q4_k_m": T.Q4_K, "q4_k_s": T.Q4_K, "q5_k_m": T.Q5_K, "q5_k_s": T.Q5_K, "q6_k": T.Q6_K,
              "q3_k_m": T.Q3_K, "q2_k": T.Q2_K, "iq4_nl": T.IQ4_NL, "iq4_xs": T.IQ4_XS}
"""Quantized by llama.cpp itself (its per-tensor mixture rules), from a 16-bit intermediate file."""
QUANTS = tuple(DIRECT) + tuple(BASE_TYPES)
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
              "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}
CHUNK_BYTES = 32 << 20
"""Rows are converted in slices of about this many float32 bytes, so peak memory stays far below one tensor."""
KNOWN_OPTIONS = ("threads", "intermediate")

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


@dataclass
class _Planned:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    """numpy order (rows, row length)."""
    type: T

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        n = int(np.prod(self.shape))
        return n // block * size


class _Writer(GGUFWriter):
    """GGUFWriter with a vectorized path for the long token/merge/type arrays (same bytes, ~30x faster)."""

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        if vtype == GGUFValueType.ARRAY and sub_type is None and isinstance(val, list) and len(val) > 256:
            head = struct.pack("<I", vtype) if add_vtype else b""
            if all(type(v) is str for v in val):
                enc = [v.encode("utf-8") for v in val]
                pack = struct.Struct("<Q").pack
                return (head + struct.pack("<IQ", GGUFValueType.STRING, len(enc))
                        + b"".join(pack(len(e)) + e for e in enc))
            if all(type(v) is int for v in val):
                return head + struct.pack("<IQ", GGUFValueType.INT32, len(val)) + np.asarray(val, "<i4").tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def tensor_names(arch: Arch) -> list[tuple[str, str]]:
    """(gguf name, HF name) in llama.cpp's order; no `output` when the embeddings are tied."""
    out = [("token_embd.weight", "model.embed_tokens.weight")]
    for n in range(arch.num_layers):
        for hf, gg in _LAYER_NAMES.items():
            if hf.endswith(".bias") and not arch.qkv_bias:
                continue
            if "_norm." in hf and "self_attn" in hf and not arch.qk_norm:
                continue
            out.append((f"blk.{n}.{gg}", f"model.layers.{n}.{hf}"))
    out.append(("output_norm.weight", "model.norm.weight"))
    if not arch.tie_word_embeddings:
        out.append(("output.weight", "lm_head.weight"))
    return out


def _direct_type(quant: str, gname: str, shape: tuple[int, ...], arch: Arch) -> T:
    if len(shape) == 1 or quant == "f32":
        return T.F32
    want = DIRECT[quant]
    if quant == "q4_0" and (gname == "output.weight" or (gname == "token_embd.weight" and arch.tie_word_embeddings)):
        want = T.Q8_0  # llama.cpp keeps the output head above 4 bits (Q6_K); gguf-py writes Q8_0 exactly
    block = GGML_QUANT_SIZES[want][0]
    return want if shape[-1] % block == 0 else T.F16


def _intermediate_type(ckpt: Checkpoint, names: list[tuple[str, str]], option: str | None) -> T:
    if option:
        types = {"bf16": T.BF16, "f16": T.F16, "f32": T.F32}
        if option not in types:
            raise QwenEdgeError(f"gguf option intermediate={option!r} (choose bf16, f16 or f32)")
        return types[option]
    dtypes = {ckpt.tensor_info(hf).dtype for _, hf in names if len(ckpt.tensor_info(hf).shape) == 2}
    if dtypes == {"BF16"}:
        return T.BF16  # what llama.cpp's converter (--outtype auto) writes for a bf16 checkpoint: no rounding
    return T.F16 if dtypes == {"F16"} else T.F32


def _write_metadata(w: GGUFWriter, ckpt: Checkpoint, ftype: int, out: Path, tok: dict[str, Any]) -> None:
    a = ckpt.arch
    name = str(ckpt.config.get("_name_or_path") or ckpt.path.name).rstrip("/").split("/")[-1] or "model"
    w.add_type("model")
    w.add_name(name)
    w.add_size_label(size_label(a))
    w.add_file_type(int(ftype))
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_context_length(a.max_position_embeddings)
    w.add_embedding_length(a.hidden_size)
    w.add_block_count(a.num_layers)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.num_heads)
    w.add_head_count_kv(a.num_kv_heads)
    if a.family == "qwen3" or a.head_dim * a.num_heads != a.hidden_size:
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.rms_norm_eps)
    add_tokenizer(w, out, a.vocab_size, tok)


def _pad(f: BinaryIO, align: int) -> None:
    pos = f.tell()
    pad = -pos % align
    if pad:
        f.write(b"\0" * pad)


def _write_tensor(f: BinaryIO, ckpt: Checkpoint, t: _Planned) -> None:
    raw = ckpt.raw(t.hf_name)
    dtype = ckpt.tensor_info(t.hf_name).dtype
    if raw.ndim == 1:
        raw = raw.reshape(1, -1)
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * raw.shape[-1]))
    start = f.tell()
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
                    raise QwenEdgeError(f"{ckpt.path.name}: tensor {t.hf_name!r} overflows float16; export bf16 or f32")
            else:
                data = gguf_quants.quantize(x, t.type)
        data.tofile(f)
    release_pages(raw)
    if f.tell() - start != t.nbytes:
        raise QwenEdgeError(f"{t.gguf_name}: wrote {f.tell() - start} bytes, expected {t.nbytes}")


def write_gguf(ckpt: Checkpoint, path: Path, plan: list[_Planned], ftype: int, out: Path,
               tok: dict[str, Any]) -> None:
    """Header, metadata and tensor table first, then each tensor streamed slice by slice from the checkpoint."""
    w = _Writer(path, ckpt.arch.family)
    try:
        _write_metadata(w, ckpt, ftype, out, tok)
        for t in plan:
            w.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        f = w.fout[0]
        from ..log import progress

        for t in progress(plan, desc="write GGUF", unit="tensor"):
            _pad(f, w.data_alignment)
            _write_tensor(f, ckpt, t)
        _pad(f, w.data_alignment)
        f.flush()
    finally:
        w.close()


def _threads(target: Any, options: dict[str, Any]) -> int:
    n = options.get("threads")
    if n is None and target is not None:
        n = target.get("threads")
    if isinstance(n, int) and n > 0:
        return n
    from ..targets import physical_cores

    return physical_cores()


def quantization_report(g: GGUFFile, quant: str) -> dict[str, Any]:
    """Per-tensor types, counts, bits per weight and every 2-D tensor that did not get the requested type."""
    base = DIRECT[quant] if quant in DIRECT else BASE_TYPES[quant]
    block = GGML_QUANT_SIZES[base][0]
    fallbacks: dict[str, dict[str, str]] = {}
    for t in g.tensors:
        if len(t.shape) < 2 or t.type == base:
            continue
        if t.shape[0] % block:
            reason = f"row length {t.shape[0]} is not a multiple of {block}"
        elif quant == "q4_0":
            reason = "output head kept at 8 bits"
        else:
            reason = f"llama.cpp {quant} mixture"
        fallbacks[t.name] = {"type": t.type_name, "reason": reason}
    return {
        "requested": quant,
        "base_type": base.name,
        "file_type": file_type_name(g.kv.get("general.file_type")),
        "method": "gguf-py" if quant in DIRECT else "llama.cpp llama_model_quantize",
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
    if quant in DIRECT:
        plan = [_Planned(g, hf, ckpt.tensor_info(hf).shape, _direct_type(quant, g, ckpt.tensor_info(hf).shape, arch))
                for g, hf in names]
        write_gguf(ckpt, dst, plan, FILE_TYPES[quant], out, tokenizer)
    else:
        inter = _intermediate_type(ckpt, names, options.get("intermediate"))
        ftype = {T.BF16: LlamaFileType.MOSTLY_BF16, T.F16: LlamaFileType.MOSTLY_F16, T.F32: LlamaFileType.ALL_F32}
        plan = [_Planned(g, hf, ckpt.tensor_info(hf).shape,
                         inter if len(ckpt.tensor_info(hf).shape) == 2 else T.F32) for g, hf in names]
        tmp = out / f".{MODEL_FILE}.{inter.name.lower()}.tmp"
        try:
            write_gguf(ckpt, tmp, plan, ftype[inter], out, tokenizer)
            llama_quantize(tmp, dst, quant, _threads(target, options))
        finally:
            tmp.unlink(missing_ok=True)
    g = check_gguf_file(dst)
    report = quantization_report(g, quant)
    write_modelfile(out, MODEL_FILE, stop_texts(out, list(tokenizer.get("stop_ids", []))))
    extra = {"gguf": {"architecture": g.architecture, "file_type": report["file_type"],
                      "intermediate": None if quant in DIRECT else inter.name,
                      "llama_cpp": _llama_cpp_version() if quant not in DIRECT else None}}
    return ExportResult(model_file=MODEL_FILE, quantization=report, context_length=arch.max_position_embeddings,
                        extra=extra)


def _llama_cpp_version() -> str | None:
    try:
        import llama_cpp

        return str(llama_cpp.__version__)
    except Exception:
        return None

