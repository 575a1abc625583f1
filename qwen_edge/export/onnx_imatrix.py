"""Importance-weighted block quantization for MatMulNBits (ONNX int4/int8 with `--imatrix`): the same layout and
graph as round-to-nearest, only the scale of each block (and so its codes) is chosen differently.

Per block, llama.cpp's q4_0/make_qx_quants search, in numpy: the error weight of column j is
`imatrix_j * sqrt(sigma2 + w_j^2)` (sigma2: the block's mean square), candidate inverse scales
`-(nmax + 0.1 i) / extreme` for i in -9..9 around the round-to-nearest one, codes rounded and clipped for each, the
scale refitted in closed form (sum a w q / sum a q^2) and the candidate with the lowest weighted error kept. The
candidate i = 0 with the unrefitted scale is round-to-nearest itself, so the weighted error is never above it.
"""

from __future__ import annotations

import numpy as np

from .onnx_quant import _pack_nibbles

STEPS = tuple(range(-9, 10))
"""Candidate offsets (tenths of a level) of the inverse scale, as llama.cpp's make_qx_quants tries."""
ROWS = 512
"""Rows searched at a time (the candidates' temporaries are a few times rows x K floats)."""


def quantize_rows_weighted(w: np.ndarray, bits: int, block: int, importance: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, None]:
    """Float32 rows [n, K] and the importance [K] of their input columns -> (data [n, blocks, blob], float32 scales
    [n, blocks], None): symmetric blocks, codes offset by 2^(bits-1) as `onnx_quant.quantize_rows` writes them."""
    n, k = w.shape
    nb = -(-k // block)
    imp = np.asarray(importance, dtype=np.float32)
    if nb * block != k:
        w = np.pad(w, ((0, 0), (0, nb * block - k)))
        imp = np.pad(imp, (0, nb * block - k))
    imp = imp.reshape(1, nb, block)
    datas, scales = [], []
    for r0 in range(0, n, ROWS):
        d, s = _search(w[r0:r0 + ROWS].reshape(-1, nb, block), bits, imp)
        datas.append(d)
        scales.append(s)
    q = np.concatenate(datas)
    if bits == 4:
        q = _pack_nibbles(q)
    return q, np.concatenate(scales).astype(np.float32), None


def _search(blocks: np.ndarray, bits: int, imp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mid = 1 << (bits - 1)
    sigma2 = np.mean(blocks * blocks, axis=-1, keepdims=True)
    a = imp * np.sqrt(sigma2 + blocks * blocks)
    idx = np.abs(blocks).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
    safe = np.where(extreme == 0, 1.0, extreme)
    # round-to-nearest first (the baseline the search must not lose to)
    best_s = extreme / -float(mid)
    best_q = _codes(blocks, np.where(extreme == 0, 0.0, -float(mid) / safe), mid)
    best_err = _err(blocks, a, best_q, best_s)
    for i in STEPS:
        inv = np.where(extreme == 0, 0.0, -(mid + 0.1 * i) / safe)
        q = _codes(blocks, inv, mid)
        aq = a * q
        den = np.sum(aq * q, axis=-1)
        s = np.divide(np.sum(aq * blocks, axis=-1), den, out=np.zeros_like(den), where=den > 0)
        err = _err(blocks, a, q, s)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        best_q = np.where(better[..., None], q, best_q)
    return (best_q + mid).astype(np.uint8), best_s


def _codes(blocks: np.ndarray, inv: np.ndarray, mid: int) -> np.ndarray:
    return np.clip(np.rint(blocks * inv[..., None]), -mid, mid - 1)


def _err(blocks: np.ndarray, a: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    r = blocks - s[..., None] * q
    return np.sum(a * r * r, axis=-1)
