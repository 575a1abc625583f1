"""GPTQ for GGUF (`--gptq`): llama.cpp writes the quantized file as without it (its per-tensor type mixture), then
each block linear whose type is Q4_0, Q4_K, Q6_K or IQ4_XS (or the fallbacks llama.cpp gives rows that are not a
multiple of 256: Q5_0, Q8_0, IQ4_NL) gets its bytes recomputed with GPTQ on that type's own
grid and overwritten in place (same type, same size; a temporary copy renamed over the file).

Per super-block (32 columns for Q4_0, 256 for the k-/IQ-types), left to right: ggml's own quantizer
(`ggml_quantize_chunk`, with the importance matrix when the export has one) applied to the CURRENT error-updated
columns gives the grid (d, dmin, sub-block scales: the block's bytes); each element's candidate values are read off
that grid by writing every code into the bytes and dequantizing with gguf-py (the oracle for the packer); then
columns are assigned the nearest candidate one at a time, the error propagated to the later columns through U
(gptq.inverse_factor), and the chosen codes packed into the block's bytes. Only the codes change, the scale bytes are
ggml's. Rows are independent, so a tensor is processed in row chunks.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QwenEdgeError

log = logging.getLogger(__name__)

ROWS = 1024
"""Rows compensated at a time (the candidate tables are codes x rows x 256 float32)."""


@dataclass(frozen=True)
class CodeLayout:
    """Where each element's code lives in a block: per element, up to two parts (byte, shift, width, code shift)."""

    qk: int
    nbytes: int
    ncodes: int
    parts: tuple[tuple[np.ndarray, np.ndarray, int, int], ...]
    """(byte index [qk], bit shift [qk], width, the part's shift inside the code) for each part."""

    def unpack(self, b: np.ndarray) -> np.ndarray:
        """Blocks [..., nbytes] uint8 -> codes [..., qk]."""
        code = np.zeros(b.shape[:-1] + (self.qk,), dtype=np.int32)
        for byte, shift, width, cs in self.parts:
            code |= ((b[..., byte].astype(np.int32) >> shift) & ((1 << width) - 1)) << cs
        return code

    def pack(self, b: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """A copy of blocks `b` [..., nbytes] with the codes [..., qk] written in (every other byte kept)."""
        mask = np.zeros(self.nbytes, dtype=np.int32)
        for byte, shift, width, _ in self.parts:
            np.bitwise_or.at(mask, byte, ((1 << width) - 1) << shift)
        out = (b & ~mask.astype(np.uint8)).astype(np.uint8)
        for byte, shift, width, cs in self.parts:
            vals = (((codes >> cs) & ((1 << width) - 1)) << shift).astype(np.uint8)
            for sh in np.unique(shift):  # within one shift the bytes are distinct
                sel = shift == sh
                out[..., byte[sel]] |= vals[..., sel]
        return out


def _layout(qk: int, nbytes: int, ncodes: int, parts: list[tuple[list[int], list[int], int, int]]) -> CodeLayout:
    return CodeLayout(qk, nbytes, ncodes, tuple((np.asarray(b), np.asarray(s), w, cs) for b, s, w, cs in parts))


def _nibbles(qk: int, offset: int, group: int) -> tuple[list[int], list[int]]:
    """Elements in groups of `group`: the first half of a group in the low nibbles of group/2 bytes, the second half
    in their high nibbles (Q4_0, Q4_K, IQ4_XS)."""
    byte, shift = [], []
    half = group // 2
    for e in range(qk):
        g, r = divmod(e, group)
        byte.append(offset + g * half + r % half)
        shift.append(0 if r < half else 4)
    return byte, shift


def _q6_k() -> CodeLayout:
    lo_b, lo_s, hi_b, hi_s = [], [], [], []
    for e in range(256):
        h, r = divmod(e, 128)
        quarter, l = divmod(r, 32)
        lo_b.append(64 * h + l + (32 if quarter in (1, 3) else 0))
        lo_s.append(4 if quarter >= 2 else 0)
        hi_b.append(128 + 32 * h + l)
        hi_s.append(2 * quarter)
    return _layout(256, 210, 64, [(lo_b, lo_s, 4, 0), (hi_b, hi_s, 2, 4)])


def layouts() -> dict[int, CodeLayout]:
    """The supported types by GGML type id."""
    from gguf.constants import GGMLQuantizationType as T

    out = {}
    for t, qk, nbytes, offset, group in ((T.Q4_0, 32, 18, 2, 32), (T.Q4_K, 256, 144, 16, 64),
                                         (T.IQ4_XS, 256, 136, 8, 32)):
        b, s = _nibbles(qk, offset, group)
        out[int(t)] = _layout(qk, nbytes, 16, [(b, s, 4, 0)])
    out[int(T.Q6_K)] = _q6_k()
    # llama.cpp's fallbacks for rows that are not a multiple of 256 (Qwen2.5-0.5B's 896): Q4_K -> Q5_0,
    # Q6_K -> Q8_0, IQ4_XS -> IQ4_NL
    b, s = _nibbles(32, 2, 32)
    out[int(T.IQ4_NL)] = _layout(32, 18, 16, [(b, s, 4, 0)])
    b, s = _nibbles(32, 6, 32)
    out[int(T.Q5_0)] = _layout(32, 22, 32, [(b, s, 4, 0), ([2 + e // 8 for e in range(32)], [e % 8 for e in range(32)],
                                                           1, 4)])
    out[int(T.Q8_0)] = _layout(32, 34, 256, [(list(range(2, 34)), [0] * 32, 8, 0)])
    return out


# --- the compensation -------------------------------------------------------------------------------------------
def candidates(layout: CodeLayout, gguf_type: int, blocks: np.ndarray) -> np.ndarray:
    """Blocks [n, nbytes] -> the value each element would have with each code [ncodes, n, qk] (gguf-py's
    dequantize of the block with every element set to that code: the grid, read by the reference itself)."""
    from gguf import dequantize
    from gguf.constants import GGMLQuantizationType

    qtype = GGMLQuantizationType(int(gguf_type))
    n = blocks.shape[0]
    out = np.empty((layout.ncodes, n, layout.qk), dtype=np.float32)
    for c in range(layout.ncodes):
        packed = layout.pack(blocks, np.full((n, layout.qk), c, dtype=np.int32))
        out[c] = dequantize(packed.reshape(1, -1), qtype).reshape(n, layout.qk)  # one call for all blocks
    return out


def gptq_tensor(w: np.ndarray, u: np.ndarray, gguf_type: int, importance: np.ndarray | None = None,
                propagate: bool = True) -> np.ndarray:
    """Float32 rows [n, k] -> their bytes [n, k / qk * nbytes] in `gguf_type`, GPTQ-compensated with U (`propagate`
    False: each column rounded to its nearest grid value without compensation, the tests' control)."""
    from .awq import _ggml_lib

    layout = layouts()[int(gguf_type)]
    n, k = w.shape
    if k % layout.qk:
        raise QwenEdgeError(f"gptq: rows of {k} are not a multiple of the type's block of {layout.qk}")
    lib = _ggml_lib()
    lib.ggml_quantize_init(int(gguf_type))
    w = np.array(w, dtype=np.float64)
    out = np.empty((n, k // layout.qk, layout.nbytes), dtype=np.uint8)
    rows = np.arange(n)
    for c0 in range(0, k, layout.qk):
        c1 = c0 + layout.qk
        cur = np.ascontiguousarray(w[:, c0:c1], dtype=np.float32)
        grid = np.zeros((n, layout.nbytes), dtype=np.uint8)
        imp = None if importance is None else np.ascontiguousarray(importance[c0:c1], dtype=np.float32)
        lib.ggml_quantize_chunk(int(gguf_type), cur.ctypes.data, grid.ctypes.data, 0, n, layout.qk,
                                None if imp is None else imp.ctypes.data)
        table = candidates(layout, gguf_type, grid)
        codes = np.empty((n, layout.qk), dtype=np.int32)
        err = np.empty((n, layout.qk))
        for j in range(c0, c1):
            col = w[:, j]
            cand = table[:, :, j - c0]
            q = np.abs(cand - col[None, :].astype(np.float32)).argmin(axis=0)
            codes[:, j - c0] = q
            e = (col - cand[q, rows]) / u[j, j]
            err[:, j - c0] = e
            if propagate and j + 1 < c1:
                w[:, j + 1:c1] -= np.outer(e, u[j, j + 1:c1])
        if propagate and c1 < k:
            w[:, c1:] -= err @ u[c0:c1, c1:]
        out[:, c0 // layout.qk] = layout.pack(grid, codes)
    return out.reshape(n, -1)


def compensate_file(path: Path, ckpt: Any, factors: dict[str, np.ndarray],
                    importance: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Recompute, in the GGUF at `path`, every tensor that has a factor (by GGUF name) and a supported type, from
    `ckpt`'s float weights; written to a temporary copy renamed over `path`. Returns the record (tensors by type,
    those left as llama.cpp wrote them)."""
    from ..families import family_of
    from ..formats.gguf import tensor_spans
    from ..model.safetensors_io import release_pages

    hf_of = {t.gguf: t.hf for t in family_of(ckpt.arch).tensor_map(ckpt.arch)}
    supported = layouts()
    jobs, skipped = [], {}
    for name, ttype, offset, nbytes in tensor_spans(path):
        if name not in factors:
            continue
        if int(ttype) in supported:
            jobs.append((name, int(ttype), offset, nbytes))
        else:
            skipped[name] = ttype.name
    if not jobs:
        raise QwenEdgeError("gguf gptq: no block linear of this quantization has a type gptq supports (Q4_0, Q4_K, "
                            f"Q6_K, IQ4_XS, Q5_0, Q8_0, IQ4_NL; here {sorted(set(skipped.values()))}); drop --gptq")
    from gguf.constants import GGMLQuantizationType as T

    from ..log import progress

    tmp = path.with_name(f".{path.name}.gptq.{os.getpid()}.tmp")
    shutil.copyfile(path, tmp)
    types: dict[str, int] = {}
    try:
        with open(tmp, "r+b") as f:
            for name, gtype, offset, nbytes in progress(jobs, desc="gptq", unit="tensor"):
                w = ckpt.tensor(hf_of[name]).astype(np.float32)
                imp = None if importance is None else importance.get(name)
                data = np.concatenate([gptq_tensor(w[r:r + ROWS], factors[name], gtype, imp)
                                       for r in range(0, w.shape[0], ROWS)])
                release_pages(factors[name])  # a spilled factor (gptq._stored) leaves the resident set
                if data.nbytes != nbytes:
                    raise QwenEdgeError(f"gguf gptq: {name} would be {data.nbytes} bytes, the file has {nbytes}")
                f.seek(offset)
                f.write(data.tobytes())
                types[T(gtype).name] = types.get(T(gtype).name, 0) + 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"tensors": len(jobs), "types": types, "left_as_quantized": skipped}
