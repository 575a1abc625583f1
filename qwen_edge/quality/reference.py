"""The reference logits record: written while verify() runs the PyTorch reference (ReferenceRecorder), read back
by `verify --on-device` (Reference). Its own module so that verify.py and verify_device.py both import it and
neither imports the other back."""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from typing import Any, Sequence

import numpy as np

from ..errors import QwenEdgeError

FORMAT_VERSION = 2
TOP_K = 64
"""Reference logits kept per position (the top-k by the reference). On the fidelity checkpoint the top-64 hold 0.87
of the probability on average (0.30 at the flattest position), and the KL bound is 96-97% of the host's full KL at
q4_k_m, int4, q8_0 and int8 (docs/verify.md): the tail a trained model leaves is spread thin over many tokens."""
MAX_TOP_K = 256
MAX_POSITIONS = 1 << 16
"""Limits on a record's shape: the packed arrays are decompressed to at most MAX_POSITIONS x MAX_TOP_K entries."""
MIN_RECORDED_MASS = 0.5
"""A record whose top-k hold less than this share of the reference's probability on average cannot bound KL
usefully: verify --on-device refuses it (exit 2). A trained model's record holds far more (the fidelity
checkpoint: 0.87); a random-weight reference's top-64 hold ~64/vocabulary (~4e-4 of Qwen's 151,936)."""
MANIFEST_KEY = "reference_logits"
"""Top-level manifest key of the record (beside `parity`, so `inspect` and `verify --json` stay small)."""


# --- packing --------------------------------------------------------------------------------------------------
def _pack(a: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(a).tobytes(), 6)).decode("ascii")


def _unpack(s: Any, dtype: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Decode a packed array of a known shape, decompressing no more than its size (a crafted record is no
    decompression bomb: the output is capped at the expected bytes, the input at what zlib could need for them)."""
    if not isinstance(s, str):
        raise QwenEdgeError(f"reference logits: {what} is not a packed array")
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(s) > 4 * ((want + want // 1000 + 64) // 3 + 1) + 4:
        raise QwenEdgeError(f"reference logits: {what} is longer than {want} bytes can pack to")
    try:
        d = zlib.decompressobj()
        raw = d.decompress(base64.b64decode(s.encode("ascii"), validate=True), want + 1)
    except (ValueError, zlib.error, UnicodeEncodeError) as e:
        raise QwenEdgeError(f"reference logits: {what} does not decode ({e})") from None
    if len(raw) != want or d.unconsumed_tail or not d.eof:
        raise QwenEdgeError(f"reference logits: {what} does not unpack to {want} bytes")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def windows_sha256(windows: Sequence[Sequence[int]]) -> str:
    """sha256 of the evaluation windows' token ids (the device must tokenize the text to exactly these)."""
    return hashlib.sha256(json.dumps([list(map(int, w)) for w in windows]).encode()).hexdigest()


class ReferenceRecorder:
    """Collects the compact reference while verify() runs the PyTorch reference window by window."""

    def __init__(self, top_k: int = TOP_K):
        self.top_k = top_k
        self.top_ids: list[np.ndarray] = []
        self.top_logits: list[np.ndarray] = []
        self.lse: list[np.ndarray] = []
        self.next_logprob: list[np.ndarray] = []
        self.windows: list[list[int]] = []
        self.greedy: list[list[int]] = []
        self.greedy_margins: list[list[float]] = []
        self.vocab = 0

    def add_window(self, ids: Sequence[int], ref: np.ndarray, chunk: int = 8, lse: np.ndarray | None = None) -> None:
        """Keep the top-k, log-sum-exp and next-token log-probability of each position (rows a few at a time, so a
        window of full-vocabulary logits is never copied whole). `lse`: the rows' log-sum-exp when the caller has
        it (verify's accumulator computes the same float64 value), saving a full-vocabulary exp pass."""
        if ref.ndim != 2 or ref.shape[0] != len(ids):
            raise QwenEdgeError(f"reference logits rows {ref.shape[0]} != {len(ids)} tokens")
        self.vocab = ref.shape[1]
        k = min(self.top_k, ref.shape[1])
        nxt = np.asarray(list(ids[1:]) + [0], dtype=np.int64)
        tops, vals, lses, lps = [], [], [], []
        for s in range(0, len(ids), chunk):
            r = np.asarray(ref[s:s + chunk])  # float32 logits order as their float64 casts do
            top = np.argpartition(-r, k - 1, axis=1)[:, :k]
            order = np.lexsort((top, -np.take_along_axis(r, top, 1)))  # by logit, ties to the lowest id (argmax's)
            top = np.take_along_axis(top, order, 1)
            if lse is not None:
                row_lse = np.asarray(lse[s:s + r.shape[0]], dtype=np.float64)
            else:
                r64 = r.astype(np.float64)
                m = r64.max(1, keepdims=True)
                row_lse = (m + np.log(np.exp(r64 - m).sum(1, keepdims=True)))[:, 0]
            tops.append(top.astype(np.int32))
            vals.append(np.take_along_axis(r, top, 1).astype(np.float32))
            lses.append(row_lse)
            lps.append(r[np.arange(r.shape[0]), nxt[s:s + r.shape[0]]].astype(np.float64) - row_lse)
        self.top_ids.append(np.concatenate(tops))
        self.top_logits.append(np.concatenate(vals))
        self.lse.append(np.concatenate(lses))
        self.next_logprob.append(np.concatenate(lps)[:-1])  # the last position has no next token in the window
        self.windows.append([int(t) for t in ids])

    def add_greedy(self, tokens: Sequence[int], margins: Sequence[float] | None = None) -> None:
        """The reference's greedy continuation and the top-2 margin at each of its steps."""
        self.greedy.append([int(t) for t in tokens])
        self.greedy_margins.append([float(m) for m in margins] if margins is not None else [np.inf] * len(tokens))

    def record(self, eval_sha256: str, quick: bool, greedy_tokens: int,
               host: dict[str, Any] | None = None) -> dict[str, Any]:
        """The manifest's record; `host`: the host verify's verdict ({"passed", "failed"}) that the device honours."""
        from ..device import hwinfo
        import platform

        n = sum(len(w) for w in self.windows)
        k = self.top_ids[0].shape[1] if self.top_ids else self.top_k
        return {
            "version": FORMAT_VERSION,
            "eval_text_sha256": eval_sha256,
            "quick": quick,
            "windows_sha256": windows_sha256(self.windows),
            "window_lengths": [len(w) for w in self.windows],
            "positions": n,
            "top_k": k,
            "vocab": self.vocab,
            "top_ids": _pack(np.concatenate(self.top_ids) if self.top_ids else np.zeros((0, k), np.int32)),
            "top_logits": _pack(np.concatenate(self.top_logits) if self.top_logits else np.zeros((0, k), np.float32)),
            "lse": _pack(np.concatenate(self.lse) if self.lse else np.zeros(0)),
            "next_logprob": _pack(np.concatenate(self.next_logprob) if self.next_logprob else np.zeros(0)),
            "greedy_tokens": greedy_tokens,
            "greedy": self.greedy,
            "greedy_margins": [[round(m, 6) if np.isfinite(m) else 1e30 for m in g] for g in self.greedy_margins],
            "host": host if host is not None else {"passed": False, "failed": ["not recorded by a host verify"]},
            "recorded_on": {"machine": platform.machine(), "cpu_features": hwinfo.cpu_features()},
        }


# --- reading the record --------------------------------------------------------------------------------------
class Reference:
    """A decoded `reference_logits` record."""

    def __init__(self, rec: Any, where: str):
        if not isinstance(rec, dict):
            raise QwenEdgeError(f"{where}: no reference logits recorded; verify it against its PyTorch reference "
                                "first (qwen-edge verify ARTIFACT, with the [verify] extra, records them)")
        if rec.get("version") != FORMAT_VERSION:
            raise QwenEdgeError(f"{where}: reference logits version {rec.get('version')!r:.20} is not "
                                f"{FORMAT_VERSION} (re-verify the artifact with this qwen-edge)")
        try:
            lengths = [int(x) for x in rec["window_lengths"]]
            n, k = int(rec["positions"]), int(rec["top_k"])
            greedy = [[int(t) for t in g] for g in rec["greedy"]]
            margins = [[float(m) for m in g] for g in rec["greedy_margins"]]
            self.greedy_tokens = int(rec["greedy_tokens"])
            self.eval_sha256, self.windows_sha256 = str(rec["eval_text_sha256"]), str(rec["windows_sha256"])
            self.quick = bool(rec["quick"])
            host = rec["host"]
            self.host_passed = host["passed"] is True
            self.host_failed = [str(x) for x in host["failed"]]
            self.recorded_on = rec.get("recorded_on") if isinstance(rec.get("recorded_on"), dict) else {}
        except (KeyError, TypeError, ValueError) as e:
            raise QwenEdgeError(f"{where}: malformed reference logits ({type(e).__name__}: {e})") from None
        if (sum(lengths) != n or any(x < 2 for x in lengths) or not 0 < k <= MAX_TOP_K or n > MAX_POSITIONS
                or [len(g) for g in margins] != [len(g) for g in greedy]):
            raise QwenEdgeError(f"{where}: malformed reference logits (positions, window lengths, top_k or greedy "
                                "runs disagree)")
        self.lengths, self.greedy, self.greedy_margins = lengths, greedy, margins
        self.top_ids = _unpack(rec["top_ids"], np.int32, (n, k), "top_ids")
        self.top_logits = _unpack(rec["top_logits"], np.float32, (n, k), "top_logits").astype(np.float64)
        self.lse = _unpack(rec["lse"], np.float64, (n,), "lse")
        self.next_logprob = _unpack(rec["next_logprob"], np.float64, (n - len(lengths),), "next_logprob")
        if (self.top_ids < 0).any():
            raise QwenEdgeError(f"{where}: malformed reference logits (negative token id)")
        self.mass = np.exp(self.top_logits - self.lse[:, None]).sum(1) if n else np.zeros(0)
