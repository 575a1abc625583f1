"""GPTQ error compensation for ONNX int4/int8 (`--gptq`, recipe `quant.gptq`): the same MatMulNBits blocks, codes
chosen so that the layer's output on calibration inputs stays close, using the correlations between input channels.

Per block linear, H = X^T X over its calibration inputs (imatrix.py's float32 forward over the calibration text;
q/k/v share one H, gate/up one, o_proj and down_proj their own), dampened by DAMP x mean(diag H). Following the GPTQ
paper (Frantar et al. 2022), columns are processed in order with U = the upper Cholesky factor of H^-1: at each block
start the block's scale is computed from the CURRENT (error-updated) weights with the export's own block quantizer
(round-to-nearest, or importance-weighted with an imatrix), then each column is rounded on that fixed grid and its
error, divided by U[j, j], is propagated to the later columns through U's row j. Rows are independent, so the export
streams row chunks as it does without GPTQ. Torch-free (numpy, float64 factorization).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import QwenEdgeError
from ..model.checkpoint import Checkpoint
from .onnx_quant import _pack_nibbles

log = logging.getLogger(__name__)

DAMP = 0.01
"""Dampening added to H's diagonal, as a fraction of its mean (the GPTQ paper's percdamp)."""

BlockGrid = Callable[[np.ndarray], np.ndarray]
"""Float32 columns of one block [n, block] -> the block's scale per row [n] (the export's quantizer's choice)."""


def inverse_factor(h: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """H [k, k] -> (U, dead): U the upper Cholesky factor of (H + damp * mean(diag) I)^-1 (float64), dead the
    columns no calibration input reached (their weights cannot matter to the outputs seen; GPTQ zeroes them, here
    they are quantized as they are with no error propagated).

    With P the reversal permutation and P H P = L L^T: H^-1 = P L^-T L^-1 P = (P L^-1 P)^T (P L^-1 P), and P L^-1 P
    is upper triangular, so U = P L^-1 P: one Cholesky and one triangular inverse (n^3 / 3 flops each), not the
    inverse of H and a second Cholesky (a 0.5B's 4864-wide down_proj H: seconds, not a minute, per layer)."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    try:
        lo = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError as e:
        raise QwenEdgeError(f"gptq: the calibration Hessian is not positive definite ({e}); more calibration text "
                            "is needed") from None
    u = np.ascontiguousarray(_lower_inverse(lo)[::-1, ::-1])
    u[dead] = 0.0
    u[dead, dead] = 1.0
    return u, dead


def _lower_inverse(lo: np.ndarray) -> np.ndarray:
    """The inverse of a lower-triangular matrix, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]
    (numpy has no triangular inverse; np.linalg.inv would cost six times the flops)."""
    n = lo.shape[0]
    if n <= 128:
        return np.tril(np.linalg.inv(lo))
    m = n // 2
    a, d = _lower_inverse(lo[:m, :m]), _lower_inverse(lo[m:, m:])
    out = np.zeros_like(lo)
    out[:m, :m], out[m:, m:] = a, d
    out[m:, :m] = -(d @ lo[m:, :m]) @ a
    return out


def rtn_scale(bits: int) -> BlockGrid:
    """onnx_quant.quantize_rows' symmetric scale (onnx_quant.symmetric_scale) as a block grid."""
    from .onnx_quant import symmetric_scale

    return lambda b: symmetric_scale(b, bits)


def weighted_scale(bits: int, importance: np.ndarray, block: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """onnx_imatrix's importance-weighted scale search for the block starting at column `c0`."""
    from .onnx_imatrix import _search

    def grid(b: np.ndarray, c0: int) -> np.ndarray:
        imp = np.asarray(importance[c0:c0 + block], dtype=np.float32)[None, None, :]
        _, s = _search(b[:, None, :], bits, imp)
        return s[:, 0]

    return grid


def gptq_rows(w: np.ndarray, u: np.ndarray, bits: int, block: int, importance: np.ndarray | None = None,
              propagate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Float32 rows [n, K] (K a multiple of `block`) and U (inverse_factor) -> (codes [n, K] in 0..2^bits-1,
    float32 scales [n, K / block]), symmetric, codes offset by 2^(bits-1) as onnx_quant writes them. `propagate`
    False is round-to-nearest on the same grid (the test's control)."""
    n, k = w.shape
    if k % block:
        raise QwenEdgeError(f"gptq: rows of {k} are not a multiple of the block size {block}")
    mid = 1 << (bits - 1)
    w = np.array(w, dtype=np.float64)
    codes = np.empty((n, k), dtype=np.uint8)
    scales = np.empty((n, k // block), dtype=np.float32)
    rtn = rtn_scale(bits)
    weighted = None if importance is None else weighted_scale(bits, importance, block)
    for c0 in range(0, k, block):
        c1 = c0 + block
        cur = w[:, c0:c1].astype(np.float32)
        s = (rtn(cur) if weighted is None else weighted(cur, c0)).astype(np.float32)
        scales[:, c0 // block] = s
        s64 = s.astype(np.float64)
        inv = np.divide(np.float32(1.0), s, out=np.zeros_like(s), where=s != 0)  # float32, as quantize_rows rounds
        err = np.empty((n, block))
        for j in range(c0, c1):
            col = w[:, j]
            q = np.clip(np.rint(col.astype(np.float32) * inv), -mid, mid - 1).astype(np.float64)
            codes[:, j] = (q + mid).astype(np.uint8)
            e = (col - q * s64) / u[j, j]
            err[:, j - c0] = e
            if propagate and j + 1 < c1:
                w[:, j + 1:c1] -= np.outer(e, u[j, j + 1:c1])
        if propagate and c1 < k:
            w[:, c1:] -= err @ u[c0:c1, c1:]
    return codes, scales


def quantize_rows_gptq(w: np.ndarray, bits: int, block: int, u: np.ndarray,
                       importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, None]:
    """`onnx_quant.quantize_rows`' output layout (data [n, blocks, blob], scales [n, blocks], None) for GPTQ codes."""
    from ..model.safetensors_io import release_pages

    n, k = w.shape
    codes, scales = gptq_rows(w, u, bits, block, importance)
    release_pages(u)  # a spilled factor's pages leave the resident set (read back from the page cache if needed)
    data = codes.reshape(n, k // block, block)
    return (_pack_nibbles(data) if bits == 4 else data), scales, None


def dequantized(codes: np.ndarray, scales: np.ndarray, bits: int, block: int) -> np.ndarray:
    """codes [n, K] and scales [n, K / block] -> float32 [n, K]."""
    n, k = codes.shape
    c = codes.astype(np.float32).reshape(n, k // block, block) - float(1 << (bits - 1))
    return (c * scales[..., None]).reshape(n, k)


def gptq_option(fmt: str, quant: str, options: dict[str, Any], refuse: tuple[str, ...]
                ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """An exporter's option `gptq` (true/false): (None, or {"text": the calibration text path or None}; the options
    left for awq/imatrix, without a calibration_text that only gptq uses). A quantization in `refuse` is a one-line
    error."""
    value = options.get("gptq")
    if value not in (None, True, False, "true", "false"):
        raise QwenEdgeError(f"{fmt} option gptq: expected true or false, not {value!r:.40}")
    rest = {k: v for k, v in options.items() if k != "gptq"}
    if value not in (True, "true"):
        return None, rest
    if quant in refuse:
        raise QwenEdgeError(f"{fmt} {quant} has nothing for gptq to compensate (it compensates the rounding of "
                            "4-bit blocks; drop --gptq)")
    if rest.get("imatrix") is None and rest.get("awq") in (None, False, "false"):
        text = rest.pop("calibration_text", None)  # gptq alone: the text is its own
    else:
        text = rest.get("calibration_text")
    return {"text": text}, rest


# --- calibration ------------------------------------------------------------------------------------------------
class HessianTap:
    """Receives each block linear's input from imatrix.collect's forward and sums X^T X per (role, layer) in
    float64. With `factor`, a layer's sums are replaced by U (inverse_factor, float32) as soon as the next layer
    begins (call `finish` after the forward), so only one layer's float64 sums are held at a time, and a factor of
    more than SPILL_BYTES lives in an unlinked temporary file (memory-mapped: page cache, not the process's)."""

    def __init__(self, factor: bool = False) -> None:
        self.h: dict[tuple[str, int], np.ndarray] = {}
        self.tokens: dict[tuple[str, int], int] = {}
        self.factor = factor
        self.u: dict[tuple[str, int], np.ndarray] = {}
        self.layer: int | None = None

    def __call__(self, role: str, layer: int, x: np.ndarray) -> None:
        if self.factor and layer != self.layer:
            self.finish()
            self.layer = layer
        x = np.ascontiguousarray(x, dtype=np.float32)
        key = (role, layer)
        # float32 products (a window is at most 512 tokens), summed over windows in float64
        self.h[key] = self.h.get(key, 0.0) + (x.T @ x).astype(np.float64)
        self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]

    def finish(self) -> None:
        for key in list(self.h):
            u, _ = inverse_factor(self.h.pop(key))
            self.u[key] = _stored(u.astype(np.float32))


SPILL_BYTES = 16 << 20


def _stored(a: np.ndarray) -> np.ndarray:
    """`a` itself, or when large a read-only map of an unlinked temporary file holding it (users drop its pages
    after use with release_pages, so the factors of every layer are never resident at once)."""
    if a.nbytes <= SPILL_BYTES:
        return a
    import tempfile

    with tempfile.TemporaryFile(prefix="qwen-edge-gptq-") as f:  # the mapping keeps the unlinked file alive
        a.tofile(f)
        f.flush()
        return np.memmap(f, dtype=a.dtype, mode="r", shape=a.shape)


def hessians(ckpt: Checkpoint, text_path: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """U (inverse_factor) of every block linear's H over the calibration text, by checkpoint weight name (fused
    parts share theirs), and the manifest's record."""
    from ..families import family_of
    from ..log import progress
    from ..model.safetensors_io import release_pages
    from ..text.tokenizer import Tokenizer
    from .imatrix import calibration_text, calibration_windows, collect

    a, fam = ckpt.arch, family_of(ckpt.arch)
    text, label = calibration_text(text_path)
    windows = calibration_windows(Tokenizer.from_dir(ckpt.path), text)
    if not windows:
        raise QwenEdgeError(f"calibration text {label}: fewer than two tokens")
    tap = HessianTap(factor=True)
    collect(ckpt, windows, progress(range(a.num_layers), desc="gptq hessians", unit="layer"), tap=tap)
    tap.finish()
    factors: dict[str, np.ndarray] = {}
    digest = hashlib.sha256()
    for (role, layer), u in sorted(tap.u.items()):
        digest.update(np.ascontiguousarray(u).tobytes())
        release_pages(u)  # reading a spilled factor made it resident
        for name in fam.checkpoint_names(a, role, layer):
            factors[name] = u
    tokens = sum(len(w) for w in windows)
    record = {"method": "GPTQ error compensation per block linear (export/gptq.py)", "calibration_text": label,
              "tokens": tokens, "damp": DAMP, "act_order": False, "sha256": digest.hexdigest()}
    return factors, record
