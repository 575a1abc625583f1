"""Activation-aware scaling (AWQ-style) before quantization, for GGUF and ONNX exports (`--awq`, recipe `quant.awq`).

Per layer and per group of linears that share an input, a per-input-channel scale `s = mean|x| ** alpha` (normalized
so that sqrt(max(s) * min(s)) = 1) multiplies the linears' weight columns, and `1/s` is folded into the op that makes
that input, so the float model computes the same function:

    q/k/v_proj columns   <- input_layernorm weight / s
    gate/up_proj columns <- post_attention_layernorm weight / s
    down_proj columns    <- up_proj output rows / s         (silu(gate) * up is linear in up)
    o_proj columns       <- v_proj output rows (and bias) / s, with s shared by the query heads of one KV head (GQA)

Qwen3's q_norm/k_norm act after q/k_proj, so the input_layernorm fold stays exact; the tied embedding/LM head and the
final norm are left alone. `alpha` is searched per group on a grid (ALPHAS) to minimise the quantized group's output
error on calibration activations: the sampled inputs X of each linear, each token's `||x W^T - (x/s) Q(W diag(s))^T||^2`
over its `||x W^T||^2` (relative: the few tokens whose down_proj input peaks ~1000x the median would otherwise decide
alone), summed over tokens and the group, where Q is the export's own quantizer: ggml's (`ggml_quantize_chunk`, the GGUF type's base type, with the
importance matrix when there is one) or the ONNX block quantizer (round-to-nearest or importance-weighted). alpha = 0
is s = 1, the unscaled weights, so on the calibration activations the search never loses to them.

The activations come from imatrix.py's float32 forward over the same calibration text (`--calibration-text`). With
`--imatrix`, the matrix (of the unscaled model) is rescaled by 1/s^2 for the scaled weights, which is exactly the
matrix of the scaled model's inputs. The scaled checkpoint is read through `ScaledCheckpoint`: each scaled tensor
is computed (float32) when an exporter reads it, so memory stays that of a plain export plus one tensor.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from ..errors import QwenEdgeError
from ..families import family_of
from ..model.checkpoint import Checkpoint
from ..model.safetensors_io import TensorInfo, release_pages, to_float32

log = logging.getLogger(__name__)

ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))
"""The exponent grid (0 = no scaling, 1 = scales proportional to mean|x|)."""
SAMPLE_ROWS = 1024
"""Calibration tokens per layer whose inputs the search quantizes against (every token feeds mean|x|)."""

Quantizer = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
"""(float32 weight [n, k], importance [k] or None) -> the dequantized float32 weight the export would store."""


# --- the scaled checkpoint --------------------------------------------------------------------------------------
class ScaledCheckpoint:
    """`base` with some tensors' columns and/or rows multiplied by vectors (read as float32, dtype F32, computed when
    an exporter reads them); everything else as `base` has it."""

    def __init__(self, base: Any, cols: dict[str, np.ndarray], rows: dict[str, np.ndarray]):
        self.base, self.cols, self.rows = base, cols, rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def _scaled(self, name: str) -> bool:
        return name in self.cols or name in self.rows

    def tensor_info(self, name: str) -> TensorInfo:
        info = self.base.tensor_info(name)
        return replace(info, dtype="F32", nbytes=math.prod(info.shape) * 4) if self._scaled(name) else info

    def raw(self, name: str) -> np.ndarray:
        if not self._scaled(name):
            return self.base.raw(name)
        stored = self.base.raw(name)
        w = to_float32(stored, self.base.tensor_info(name).dtype)  # a fresh array
        release_pages(stored)
        if name in self.cols:
            w *= self.cols[name][None, :]
        if name in self.rows:
            w *= self.rows[name][:, None] if w.ndim == 2 else self.rows[name]
        return w

    def tensor(self, name: str) -> np.ndarray:
        return to_float32(self.raw(name), self.tensor_info(name).dtype)


# --- quantizers the search measures -----------------------------------------------------------------------------
_ggml: Any = None


def _ggml_lib() -> Any:
    global _ggml
    if _ggml is None:
        from ..device.llama_lib import import_llama_cpp

        llama_cpp = import_llama_cpp()
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        _ggml = lib
    return _ggml


def ggml_quantizer(gguf_type: Any) -> Quantizer:
    """ggml's own quantizer for `gguf_type` (what llama_model_quantize calls per tensor), dequantized by gguf-py."""
    from gguf import dequantize
    from gguf.constants import GGML_QUANT_SIZES

    lib = _ggml_lib()
    lib.ggml_quantize_init(int(gguf_type))
    block, size = GGML_QUANT_SIZES[gguf_type]

    def q(w: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
        n, k = w.shape
        w = np.ascontiguousarray(w, dtype=np.float32)
        dst = np.zeros((n, k // block * size), dtype=np.uint8)
        im = None if imp is None else np.ascontiguousarray(imp, dtype=np.float32)
        lib.ggml_quantize_chunk(int(gguf_type), w.ctypes.data, dst.ctypes.data, 0, n, k,
                                None if im is None else im.ctypes.data)
        return dequantize(dst, gguf_type).reshape(n, k).astype(np.float32)

    q.block = block  # type: ignore[attr-defined]
    return q


def onnx_quantizer(bits: int, block: int) -> Quantizer:
    """The ONNX exporter's symmetric block quantizer (round-to-nearest, or importance-weighted with a matrix)."""
    from .onnx_imatrix import quantize_rows_weighted
    from .onnx_quant import quantize_rows

    def q(w: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
        n, k = w.shape
        data, scales, _ = (quantize_rows(w, bits, block, True) if imp is None
                           else quantize_rows_weighted(w, bits, block, imp))
        if bits == 4:
            data = np.stack([data & 0xF, data >> 4], axis=-1).reshape(n, scales.shape[1], block)
        codes = data.astype(np.float32) - float(1 << (bits - 1))
        return (codes * scales[..., None]).reshape(n, -1)[:, :k]

    q.block = block  # type: ignore[attr-defined]
    return q


# --- statistics and search --------------------------------------------------------------------------------------
@dataclass
class Group:
    """Linears sharing one input (checkpoint names), and where 1/s goes."""

    role: str
    layer: int
    linears: list[str]
    fold_rows: list[str]
    """Tensors whose rows (a 1-D norm weight: whose entries) are divided by s (v_proj: by the KV-head scale)."""


def _groups(ckpt: Checkpoint, i: int) -> dict[str, Group]:
    a, fam = ckpt.arch, family_of(ckpt.arch)

    def names(role: str) -> list[str]:
        return list(fam.checkpoint_names(a, role, i))

    q, k, v = names("qkv_proj")
    gate, up = names("gate_up_proj")
    return {
        "qkv_proj": Group("qkv_proj", i, [q, k, v], names("input_layernorm")),
        "o_proj": Group("o_proj", i, names("o_proj"), [v] + names("qkv_proj.bias")[2:]),
        "gate_up_proj": Group("gate_up_proj", i, [gate, up], names("post_attention_layernorm")),
        "down_proj": Group("down_proj", i, names("down_proj"), [up]),
    }


class _Tap:
    """Receives each block linear's input from the imatrix forward (`collect(..., tap=)`): mean |x| per channel
    over every token and a strided sample of rows; searches a layer's groups as soon as the next layer begins."""

    def __init__(self, ckpt: Checkpoint, total_tokens: int, search: Callable[[Group, np.ndarray, np.ndarray], Any]):
        self.ckpt, self.search = ckpt, search
        self.stride = max(1, total_tokens // SAMPLE_ROWS)
        self.layer: int | None = None
        self.abs: dict[str, np.ndarray] = {}
        self.n: dict[str, int] = {}
        self.rows: dict[str, list[np.ndarray]] = {}

    def __call__(self, role: str, layer: int, x: np.ndarray) -> None:
        if layer != self.layer:
            self.flush()
            self.layer = layer
        self.abs[role] = self.abs.get(role, 0.0) + np.abs(x).sum(axis=0, dtype=np.float64)
        self.n[role] = self.n.get(role, 0) + x.shape[0]
        self.rows.setdefault(role, []).append(x[::self.stride].astype(np.float32))

    def flush(self) -> None:
        if self.layer is None:
            return
        for role, g in _groups(self.ckpt, self.layer).items():
            self.search(g, (self.abs[role] / max(self.n[role], 1)).astype(np.float32),
                        np.concatenate(self.rows[role]))
        self.abs, self.n, self.rows = {}, {}, {}
        self.layer = None


def _kv_shared(mean_abs: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """o_proj's input channels (head h, dim j) averaged over the query heads of each KV head: v_proj's rows are one
    per KV head, so one scale must serve them all."""
    d = mean_abs.size // heads
    per_kv = mean_abs.reshape(kv_heads, heads // kv_heads, d).mean(axis=1)
    return np.repeat(per_kv[:, None, :], heads // kv_heads, axis=1).reshape(-1)


def _scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    s = np.maximum(mean_abs.astype(np.float64), 1e-8) ** alpha
    s = s / math.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def search_group(weights: list[np.ndarray], x: np.ndarray, mean_abs: np.ndarray, quantize: Quantizer,
                 importance: np.ndarray | None = None) -> tuple[float, np.ndarray, list[float]]:
    """The alpha (and its scales) with the lowest quantized output error of `weights` ([n_i, k] each, one input)
    on the sampled inputs `x` [t, k]; also each alpha's error (ALPHAS order)."""
    refs = [x @ w.T for w in weights]
    norm = sum(np.einsum("ij,ij->i", y, y, dtype=np.float64) for y in refs)
    tw = 1.0 / np.maximum(norm, 1e-12 * max(float(norm.max()), 1e-30))  # each token's error relative to its output
    errs: list[float] = []
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in ALPHAS:
        s = _scales(mean_abs, alpha)
        imp = None if importance is None else importance / (s * s)
        xs = x / s
        err = 0.0
        for w, y in zip(weights, refs):
            r = y - xs @ quantize(w * s[None, :], imp).T
            err += float(np.einsum("ij,ij,i->", r, r, tw, dtype=np.float64))
        errs.append(err)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    return best[1], best[2], errs


def awq_scales(ckpt: Checkpoint, quantize: Quantizer, importance: dict[str, np.ndarray] | None = None,
               text_path: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Search every layer's groups; returns (column scales, row scales) by checkpoint name and a record."""
    from ..log import progress
    from ..text.tokenizer import Tokenizer
    from .imatrix import calibration_text, calibration_windows, collect

    a = ckpt.arch
    text, label = calibration_text(text_path)
    windows = calibration_windows(Tokenizer.from_dir(ckpt.path), text)
    if not windows:
        raise QwenEdgeError(f"calibration text {label}: fewer than two tokens")
    cols: dict[str, np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}
    alphas: dict[str, float] = {}
    gains: dict[str, float] = {}

    def search(g: Group, mean_abs: np.ndarray, x: np.ndarray) -> None:
        if g.role == "o_proj":
            mean_abs = _kv_shared(mean_abs, a.num_heads, a.num_kv_heads)
        block = getattr(quantize, "block", 1)
        if x.shape[1] % block:  # the type cannot hold these rows as asked (llama.cpp falls back): leave them
            return
        imp = None if importance is None else importance.get(g.linears[0])
        ws = [ckpt.tensor(n) for n in g.linears]
        alpha, s, errs = search_group(ws, x, mean_abs, quantize, imp)
        alphas[f"{g.layer}.{g.role}"] = alpha
        gains[f"{g.layer}.{g.role}"] = round(1.0 - min(errs) / errs[0], 4) if errs[0] > 0 else 0.0
        if alpha == 0.0:
            return
        for n in g.linears:
            cols[n] = cols[n] * s if n in cols else s
        inv = 1.0 / s
        if g.role == "o_proj":  # v_proj's rows: one per (KV head, dim)
            d = a.head_dim
            inv = inv.reshape(a.num_heads, d)[:: a.num_heads // a.num_kv_heads].reshape(-1)
        for n in g.fold_rows:
            rows[n] = rows[n] * inv if n in rows else inv

    tap = _Tap(ckpt, sum(len(w) for w in windows), search)
    collect(ckpt, windows, progress(range(a.num_layers), desc="awq", unit="layer"), tap=tap)
    tap.flush()
    digest = hashlib.sha256()
    for n in sorted(cols):
        digest.update(n.encode() + cols[n].tobytes())
    record = {"method": "activation-aware per-channel scales folded into the preceding op (export/awq.py)",
              "calibration_text": label, "alphas": alphas, "calibration_error_reduction": gains,
              "sample_rows": SAMPLE_ROWS, "sha256": digest.hexdigest()}
    return cols, rows, record


# --- the exporters' hook ----------------------------------------------------------------------------------------
def calibrated(ckpt: Checkpoint, fmt: str, quant: str, options: dict[str, Any], refuse: tuple[str, ...],
               quantizer: Callable[[], Quantizer]) -> tuple[Any, dict[str, np.ndarray] | None, dict[str, Any] | None,
                                                            dict[str, Any] | None]:
    """Options `imatrix`, `calibration_text` and `awq` of an exporter: (the checkpoint to export: scaled with awq,
    the importance vectors by GGUF name (rescaled for the scaled weights), the imatrix record, the awq record)."""
    from .imatrix import imatrix_option

    awq = options.get("awq")
    if awq not in (None, True, False, "true", "false"):
        raise QwenEdgeError(f"{fmt} option awq: expected true or false, not {awq!r:.40}")
    awq = awq in (True, "true")
    opts = dict(options)
    if awq and opts.get("imatrix") is None and opts.get("calibration_text") is not None:
        opts.pop("calibration_text")  # awq alone: the text is its own
    values, record = imatrix_option(ckpt, fmt, quant, opts, refuse)
    if not awq:
        return ckpt, values, record, None
    if quant in refuse:
        raise QwenEdgeError(f"{fmt} {quant} has nothing for awq to protect (it scales the weights of the 4-bit-and-"
                            "below types; drop --awq)")
    fam = family_of(ckpt.arch)
    gguf_of = {t.hf: t.gguf for t in fam.tensor_map(ckpt.arch)}
    hf_imp = None if values is None else {hf: values[g] for hf, g in gguf_of.items() if g in values}
    cols, rows, awq_record = awq_scales(ckpt, quantizer(), hf_imp, options.get("calibration_text"))
    if values is not None:
        values = {g: (v / (cols[hf] * cols[hf]) if hf in cols else v).astype(np.float32)
                  for hf, g in gguf_of.items() if (v := values.get(g)) is not None}
    return ScaledCheckpoint(ckpt, cols, rows), values, record, awq_record
