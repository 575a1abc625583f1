"""Checkpoint tensors read in bounded float32 chunks whose memory-mapped pages are released as they are consumed."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..model.checkpoint import Checkpoint
from ..model.safetensors_io import release_pages, to_float32

CHUNK_BYTES = 16 << 20
"""float32 bytes per chunk: the quantizer's temporaries stay a few times this, whatever the tensor's size."""


class Source:
    """The checkpoint as row chunks of float32: one tensor, or the row-wise concatenation of several (fused qkv)."""

    def __init__(self, ckpt: Checkpoint, chunk_bytes: int | None = None):
        self.ckpt = ckpt
        self.chunk_bytes = chunk_bytes or CHUNK_BYTES

    def shape(self, names: list[str]) -> tuple[int, ...]:
        """The concatenation's shape: rows summed over `names`, the trailing dims of the first."""
        shapes = [tuple(self.ckpt.tensor_info(n).shape) for n in names]
        if len(shapes[0]) == 1:
            return (sum(s[0] for s in shapes),)
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(f"cannot concatenate {names}: shapes {shapes}")
        return (sum(s[0] for s in shapes),) + shapes[0][1:]

    def _rows_per_chunk(self, row_elems: int) -> int:
        return max(1, self.chunk_bytes // (4 * max(row_elems, 1)))

    def rows(self, names: list[str]) -> Iterator[np.ndarray]:
        """Fresh float32 chunks of whole rows, in order (a 1-D tensor as one chunk); the source pages under each are
        released as soon as it is converted."""
        for name in names:
            raw = self.ckpt.raw(name)
            dtype = self.ckpt.tensor_info(name).dtype
            step = self._rows_per_chunk(int(np.prod(raw.shape[1:]))) if raw.ndim > 1 else max(raw.shape[0], 1)
            for r0 in range(0, raw.shape[0], step):
                part = raw[r0:r0 + step]
                x = to_float32(part, dtype)  # a copy (astype), never a view of the map
                release_pages(part)
                yield x

    def columns_t(self, names: list[str]) -> Iterator[np.ndarray]:
        """Row chunks of the transpose of the 2-D concatenation ([K, N] from [N, K] parts), float32, C-contiguous."""
        raws = [(self.ckpt.raw(n), self.ckpt.tensor_info(n).dtype) for n in names]
        n_total = sum(r.shape[0] for r, _ in raws)
        k = raws[0][0].shape[1]
        step = self._rows_per_chunk(n_total)
        for c0 in range(0, k, step):
            block = np.concatenate([to_float32(r[:, c0:c0 + step], dt) for r, dt in raws])
            if c0 + step >= k:  # every chunk reads every row: the pages go once the last has been read
                for r, _ in raws:
                    release_pages(r)
            yield np.ascontiguousarray(block.T)

    def tensor(self, names: list[str]) -> np.ndarray:
        """The whole float32 concatenation at once (small tensors only: norms, biases)."""
        return np.concatenate(list(self.rows(names)))
