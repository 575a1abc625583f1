"""Block-wise weight-only quantization in onnxruntime's MatMulNBits / GatherBlockQuantized layout (numpy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROW_CHUNK = 4096
"""Rows quantized at a time: bounds the float32 temporaries to a few tens of MB even for the vocab table."""


@dataclass(frozen=True)
class QuantLayout:
    """The shapes of one block-quantized [N, K] weight, known before any row is quantized (so it can be streamed)."""

    n: int
    k: int
    bits: int
    block_size: int
    symmetric: bool = True

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def blob(self) -> int:
        return self.block_size * self.bits // 8

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self.n, self.blocks, self.blob)

    @property
    def type_name(self) -> str:
        return f"int{self.bits}-b{self.block_size}-{'sym' if self.symmetric else 'asym'}"


@dataclass
class BlockQuant:
    """One quantized [N, K] weight: `data` uint8 [N, k_blocks, blob], `scales` [N, k_blocks], `zero_points` or None."""

    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    k: int
    n: int

    @property
    def type_name(self) -> str:
        return f"int{self.bits}-b{self.block_size}-{'asym' if self.zero_points is not None else 'sym'}"


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 2m] values in 0..15 -> [..., m] bytes, even element in the low nibble (MatMulNBits order)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def symmetric_scale(blocks: np.ndarray, bits: int) -> np.ndarray:
    """Blocks [..., block] -> their symmetric scales [...]: int4 q4_0 style (the signed extreme maps to -8, so the
    full 16 levels are used), else max|w| maps to 2^(bits-1) - 1."""
    mid = 1 << (bits - 1)
    if bits == 4:
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        return np.take_along_axis(blocks, idx, axis=-1)[..., 0] / -float(mid)
    return np.abs(blocks).max(axis=-1) / float(mid - 1)


def quantize_rows(w: np.ndarray, bits: int, block: int,
                  symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Float32 rows [n, K] -> (data [n, blocks, blob], float32 scales [n, blocks], zero points or None); each row
    on its own, so any split into row chunks gives the same bytes."""
    n, k = w.shape
    nb = -(-k // block)
    if nb * block != k:
        w = np.pad(w, ((0, 0), (0, nb * block - k)))
    blocks = w.reshape(n, nb, block)
    levels = (1 << bits) - 1
    mid = 1 << (bits - 1)
    if symmetric:
        scale = symmetric_scale(blocks, bits)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
        q = np.clip(np.rint(blocks * inv[..., None]) + mid, 0, levels).astype(np.uint8)
        zp = None
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / float(levels)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
        zp = np.clip(np.rint(-lo * inv), 0, levels).astype(np.uint8)
        q = np.clip(np.rint(blocks * inv[..., None]) + zp[..., None], 0, levels).astype(np.uint8)
        if bits == 4:
            if nb % 2:
                zp = np.pad(zp, ((0, 0), (0, 1)))
            zp = _pack_nibbles(zp)
    if bits == 4:
        q = _pack_nibbles(q)
    return q, scale.astype(np.float32), zp


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> BlockQuant:
    """Quantize a float [N, K] weight (HF `out x in` layout) per row in blocks of `block_size` along K."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, not {block_size}")
    n, k = w.shape
    parts = [quantize_rows(np.asarray(w[i:i + ROW_CHUNK], dtype=np.float32), bits, block_size, symmetric)
             for i in range(0, n, ROW_CHUNK)]
    data = np.concatenate([p[0] for p in parts])
    scales = np.concatenate([p[1] for p in parts])
    zps = None if symmetric else np.concatenate([p[2] for p in parts])
    return BlockQuant(data, scales, zps, bits, block_size, k, n)


def dequantize(q: BlockQuant) -> np.ndarray:
    """The float32 [N, K] weight a BlockQuant stands for (tests and error reports)."""
    data = q.data
    if q.bits == 4:
        data = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(q.n, data.shape[1], -1)
    nb = data.shape[1]
    if q.zero_points is None:
        zp = np.full((q.n, nb), 1 << (q.bits - 1), dtype=np.float32)
    elif q.bits == 4:
        zp = np.stack([q.zero_points & 0x0F, q.zero_points >> 4], axis=-1).reshape(q.n, -1)[:, :nb].astype(np.float32)
    else:
        zp = q.zero_points.astype(np.float32)
    w = (data.astype(np.float32) - zp[..., None]) * q.scales[..., None]
    return w.reshape(q.n, -1)[:, :q.k]
