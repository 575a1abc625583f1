"""Verify on the device, without torch: reference logits recorded at verify time, recomputed by the local runtime.

When an artifact is verified against its PyTorch reference (verify.py), the reference's logits on the fixed
evaluation text are recorded compactly in the manifest (`reference_logits`): per position the top-k token ids and
logits, the log-sum-exp and the log-probability of the next token, plus the reference's greedy continuations.
`qwen-edge verify ARTIFACT --on-device` runs the artifact on the local runtime (onnxruntime or llama.cpp, whatever
this machine has), recomputes the same metrics against the recorded reference and applies the same thresholds.
Nothing here imports torch.

What the compact record gives exactly, and what it bounds:
- top1_agreement, ppl_reference/ppl_artifact/ppl_rel_change, greedy_common_prefix_mean/min: exact (the same values
  a full verify computes on this runtime).
- kl_mean, kl_p99: KL over the reference's top-k tokens plus one bucket for the rest of the vocabulary. Merging
  outcomes never increases KL (log-sum inequality), so this is a lower bound of the full KL; on peaked outputs
  (trained weights) the top-k hold nearly all the mass and the bound is tight (`topk_mass_mean` says how much).
- max_abs_logit_error, mean_abs_logit_error: over the reference's top-k tokens of every position.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import QwenEdgeError
from .verify import Accumulator

FORMAT_VERSION = 1
TOP_K = 8
"""Reference logits kept per position (the top-k by the reference)."""
MANIFEST_KEY = "reference_logits"
"""Top-level manifest key of the record (beside `parity`, so `inspect` and `verify --json` stay small)."""


# --- packing --------------------------------------------------------------------------------------------------
def _pack(a: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(a).tobytes(), 6)).decode("ascii")


def _unpack(s: Any, dtype: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    if not isinstance(s, str):
        raise QwenEdgeError(f"reference logits: {what} is not a packed array")
    try:
        raw = zlib.decompress(base64.b64decode(s.encode("ascii"), validate=True))
    except (ValueError, zlib.error, UnicodeEncodeError) as e:
        raise QwenEdgeError(f"reference logits: {what} does not decode ({e})") from None
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != want:
        raise QwenEdgeError(f"reference logits: {what} has {len(raw)} bytes, expected {want}")
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
        self.vocab = 0

    def add_window(self, ids: Sequence[int], ref: np.ndarray, chunk: int = 8) -> None:
        """Keep the top-k, log-sum-exp and next-token log-probability of each position (rows a few at a time, so a
        window of full-vocabulary logits is never copied whole)."""
        if ref.ndim != 2 or ref.shape[0] != len(ids):
            raise QwenEdgeError(f"reference logits rows {ref.shape[0]} != {len(ids)} tokens")
        self.vocab = ref.shape[1]
        k = min(self.top_k, ref.shape[1])
        nxt = np.asarray(list(ids[1:]) + [0], dtype=np.int64)
        tops, vals, lses, lps = [], [], [], []
        for s in range(0, len(ids), chunk):
            r = np.asarray(ref[s:s + chunk], dtype=np.float64)
            top = np.argpartition(-r, k - 1, axis=1)[:, :k]
            order = np.lexsort((top, -np.take_along_axis(r, top, 1)))  # by logit, ties to the lowest id (argmax's)
            top = np.take_along_axis(top, order, 1)
            m = r.max(1, keepdims=True)
            lse = (m + np.log(np.exp(r - m).sum(1, keepdims=True)))[:, 0]
            tops.append(top.astype(np.int32))
            vals.append(np.take_along_axis(r, top, 1).astype(np.float32))
            lses.append(lse)
            lps.append(r[np.arange(r.shape[0]), nxt[s:s + r.shape[0]]] - lse)
        self.top_ids.append(np.concatenate(tops))
        self.top_logits.append(np.concatenate(vals))
        self.lse.append(np.concatenate(lses))
        self.next_logprob.append(np.concatenate(lps)[:-1])  # the last position has no next token in the window
        self.windows.append([int(t) for t in ids])

    def add_greedy(self, tokens: Sequence[int]) -> None:
        self.greedy.append([int(t) for t in tokens])

    def record(self, eval_sha256: str, quick: bool, greedy_tokens: int) -> dict[str, Any]:
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
            self.greedy_tokens = int(rec["greedy_tokens"])
            self.eval_sha256, self.windows_sha256 = str(rec["eval_text_sha256"]), str(rec["windows_sha256"])
            self.quick = bool(rec["quick"])
        except (KeyError, TypeError, ValueError) as e:
            raise QwenEdgeError(f"{where}: malformed reference logits ({type(e).__name__}: {e})") from None
        if sum(lengths) != n or any(x < 2 for x in lengths) or not 0 < k <= 1024 or n > 1 << 22:
            raise QwenEdgeError(f"{where}: malformed reference logits (positions, window lengths, top_k disagree)")
        self.lengths, self.greedy = lengths, greedy
        self.top_ids = _unpack(rec["top_ids"], np.int32, (n, k), "top_ids")
        self.top_logits = _unpack(rec["top_logits"], np.float32, (n, k), "top_logits").astype(np.float64)
        self.lse = _unpack(rec["lse"], np.float64, (n,), "lse")
        self.next_logprob = _unpack(rec["next_logprob"], np.float64, (n - len(lengths),), "next_logprob")
        if (self.top_ids < 0).any():
            raise QwenEdgeError(f"{where}: malformed reference logits (negative token id)")


@dataclass
class DeviceAccumulator(Accumulator):
    """verify's metrics of the artifact's full logits against the compact reference, window by window."""

    mass: list[np.ndarray] = field(default_factory=list)
    """Reference probability held by the recorded top-k tokens, per position."""

    def add_compact(self, ids: Sequence[int], art: np.ndarray, top_ids: np.ndarray, top_ref: np.ndarray, lse_ref: np.ndarray,
            next_lp_ref: np.ndarray, chunk: int = 8) -> None:
        if art.ndim != 2 or art.shape[0] != len(ids):
            raise QwenEdgeError(f"logits rows {art.shape[0]} != {len(ids)} tokens")
        if int(top_ids.max(initial=0)) >= art.shape[1]:
            raise QwenEdgeError(f"reference token id {int(top_ids.max())} outside the artifact's vocabulary "
                                f"({art.shape[1]})")
        nxt = np.asarray(list(ids[1:]) + [0], dtype=np.int64)
        for s in range(0, len(ids), chunk):
            a = np.asarray(art[s:s + chunk], dtype=np.float64)
            if not np.isfinite(a).all():
                a = np.nan_to_num(a, nan=1e4, posinf=1e4, neginf=-1e4)  # broken artifacts: huge error, not a crash
            ti, tr, lr = top_ids[s:s + chunk].astype(np.int64), top_ref[s:s + chunk], lse_ref[s:s + chunk]
            ma = a.max(1, keepdims=True)
            lse_a = (ma + np.log(np.exp(a - ma).sum(1, keepdims=True)))[:, 0]
            a_top = np.take_along_axis(a, ti, 1)
            d = np.abs(tr - a_top)
            self.max_abs = max(self.max_abs, float(d.max(initial=0.0)))
            self.abs_sum += float(d.sum())
            self.abs_count += d.size
            # KL(p||q) over the top-k tokens plus one bucket for the rest: a lower bound of the full KL
            lp = tr - lr[:, None]
            lq = a_top - lse_a[:, None]
            p = np.exp(lp)
            p_rest = np.clip(1.0 - p.sum(1), 0.0, 1.0)
            q_rest = np.clip(1.0 - np.exp(lq).sum(1), 1e-300, 1.0)
            rest = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
            self.kl.append(np.maximum((p * (lp - lq)).sum(1) + rest, 0.0))
            self.mass.append(p.sum(1))
            self.agree += int((ti[:, 0] == a.argmax(1)).sum())
            self.tokens += a.shape[0]
            rows = np.arange(a.shape[0])
            lp_next = a[rows, nxt[s:s + a.shape[0]]] - lse_a
            if s + a.shape[0] == len(ids):
                lp_next = lp_next[:-1]  # the last position has no next token in the window
            self.nll_art -= float(lp_next.sum())
            self.predicted += len(lp_next)
        self.nll_ref -= float(next_lp_ref.sum())

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "topk_mass_mean": float(np.concatenate(self.mass).mean()) if self.mass else 0.0}


# --- the on-device gate ----------------------------------------------------------------------------------------
def verify_on_device(artifact: str, *, threads: int | None = None, target: str | None = None,
                     thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Recompute the recorded reference positions with this machine's runtime; the same gates as verify().

    Returns a report like verify()'s (`passed`, `metrics`, `thresholds`, `failed`, ...), `on_device: True`."""
    from .artifact import Artifact
    from .backends import load
    from .tokenizer import Tokenizer
    from .verify import GREEDY_TOKENS, RANDOM_WEIGHT_THRESHOLDS, common_prefix, gate, greedy, load_eval_set, \
        thresholds_for

    t0 = time.perf_counter()
    art = Artifact.open(artifact)  # every file's sha256: the bytes verified are the bytes run
    parity = art.manifest.get("parity")
    ref = Reference(art.manifest.get(MANIFEST_KEY), str(art.path))
    tok = Tokenizer.from_dir(art.path)
    ev = load_eval_set(tok, quick=ref.quick)
    if ev.sha256 != ref.eval_sha256:
        raise QwenEdgeError(f"{art.path}: reference logits were recorded on another evaluation text (another "
                            "qwen-edge version); re-verify the artifact against its reference")
    if [len(w) for w in ev.windows] != ref.lengths or windows_sha256(ev.windows) != ref.windows_sha256:
        raise QwenEdgeError(f"{art.path}: this machine tokenizes the evaluation text differently from the "
                            "reference (token ids differ): the tokenizer is not the one verified")
    if len(ref.greedy) != len(ev.prompts):
        raise QwenEdgeError(f"{art.path}: malformed reference logits ({len(ref.greedy)} greedy runs for "
                            f"{len(ev.prompts)} prompts)")
    limits = thresholds_for(art.quant, art.bits_per_weight, thresholds)
    ungated: list[str] = []
    if isinstance(parity, dict) and parity.get("random_weights"):
        ungated = [k for k in RANDOM_WEIGHT_THRESHOLDS if k not in (thresholds or {})]
        limits.update({k: RANDOM_WEIGHT_THRESHOLDS[k] for k in ungated})
    n_greedy = ref.greedy_tokens or GREEDY_TOKENS
    longest = max(ref.lengths + [len(p) + n_greedy for p in ev.prompts])
    acc = DeviceAccumulator()
    prefixes: list[int] = []
    rt = load(art.path, target=target, max_context=longest + 8, threads=threads)
    try:
        from .log import progress

        pos = 0
        nxt = 0
        for w in progress(ev.windows, desc="verify", unit="window"):
            n = len(w)
            rt.reset()
            acc.add_compact(w, rt.prefill_all_logits(w), ref.top_ids[pos:pos + n], ref.top_logits[pos:pos + n],
                    ref.lse[pos:pos + n], ref.next_logprob[nxt:nxt + n - 1])
            pos += n
            nxt += n - 1
        for p, g in zip(ev.prompts, ref.greedy):
            prefixes.append(common_prefix(g, greedy(rt, p, len(g))))
        info = rt.info
    finally:
        rt.close()
    metrics = acc.metrics()
    metrics["greedy_common_prefix_mean"] = float(np.mean(prefixes)) if prefixes else 0.0
    metrics["greedy_common_prefix_min"] = float(min(prefixes)) if prefixes else 0.0
    failed = gate(metrics, limits)
    import platform

    return {
        "passed": not failed,
        "metrics": metrics,
        "thresholds": limits,
        "failed": failed,
        "on_device": True,
        "artifact": str(art.path),
        "reference": "recorded reference logits (top-%d per position)" % ref.top_ids.shape[1],
        "format": art.format,
        "quant": art.quant,
        "tokens_evaluated": acc.tokens,
        "windows": len(ev.windows),
        "greedy_tokens": n_greedy,
        "greedy_prefixes": prefixes,
        "quick": ref.quick,
        "random_weights": bool(isinstance(parity, dict) and parity.get("random_weights")),
        "ungated": ungated,
        "eval_text_sha256": ev.sha256,
        "backend": info.backend,
        "machine": platform.machine(),
        "threads": info.threads,
        "recorded_metrics": parity.get("metrics") if isinstance(parity, dict) else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def render_device_report(report: dict[str, Any]) -> str:
    """verify's report, with where it ran and what the compact reference gives exactly."""
    from .verify import render_report

    lines = render_report(report).splitlines()
    lines[1:1] = [f"on this device: {report['machine']}, {report['backend']}, {report['threads']} threads"]
    lines[-1:-1] = [f"  {'topk_mass_mean':<28} {report['metrics']['topk_mass_mean']:>12.6g}",
                    "  note: KL over the reference's top-k tokens and the rest as one bucket (a lower bound of the "
                    "full KL); logit errors over the top-k tokens; top-1, perplexity and greedy are exact"]
    return "\n".join(lines)


def run_verify_on_device(artifact: str, as_json: bool = False, threads: int | None = None,
                         target: str | None = None) -> int:
    """`qwen-edge verify ARTIFACT --on-device`: GateFailed (exit 1) when a gate fails."""
    from .verify import emit_gated

    return emit_gated(verify_on_device(artifact, threads=threads, target=target), as_json, render_device_report)
