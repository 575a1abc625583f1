"""Verify on the device, without torch: reference logits recorded at verify time, recomputed by the local runtime.

When an artifact is verified against its PyTorch reference (verify.py), the reference's logits on the fixed
evaluation text are recorded compactly in the manifest (`reference_logits`): per position the top-k token ids and
logits (k = TOP_K), the log-sum-exp (so the mass outside the top-k is known) and the log-probability of the next
token, the reference's greedy continuations with the top-2 margin of each step, and the host's verdict.
`qwen-edge verify ARTIFACT --on-device` runs the artifact on the local runtime (onnxruntime or llama.cpp, whatever
this machine has) and gates what the record can prove. Nothing here imports torch.

- The host's verdict: the record is written whether the host verify passed or not, with that verdict; a record of a
  failed host verify never passes on the device (it fails as `host_verify`, naming the host's failed metrics).
- Exact (the values a full verify computes on this runtime): top1_agreement, ppl_reference/ppl_artifact/
  ppl_rel_change, greedy_common_prefix_mean/min (near-ties as in verify.greedy_agreement).
- Lower bounds, gated with the host metric's threshold (a bound above it proves the full metric above it; a bound
  below it proves nothing more than that bound): kl_mean_bound and kl_p99_bound (KL over the reference's top-k
  tokens plus one bucket for the rest of the vocabulary: merging outcomes never increases KL, the log-sum
  inequality), max_abs_logit_error_bound (over the top-k tokens).
- The bound is tight only where the top-k hold nearly all of the reference's probability: a record holding less
  than MIN_RECORDED_MASS on average (a random-weight reference: near-uniform outputs) is refused (exit 2), since
  its KL bound would be ~0 whatever the artifact does. recorded_mass_mean/min say what the record holds.
- Reported only: mean_abs_logit_error_topk (over the top-k tokens: not a bound of the full mean).
- Not covered: contexts longer than the evaluation windows (256 tokens), sampling, chat templates other than the
  text's, constrained decoding; see docs/verify.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import QwenEdgeError
from .reference import MANIFEST_KEY, MIN_RECORDED_MASS, Reference, windows_sha256
from .verify import Accumulator

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
COVERS = ("covers: this artifact's files (sha256) on this machine's runtime, on the evaluation text the host verified "
          "(windows of up to 256 tokens from an empty cache) and its greedy prompts; top-1, perplexity and greedy "
          "exact; KL and max logit error as lower bounds from the recorded top-k")
NOT_COVERED = ("not covered: contexts beyond the evaluation windows, sampling, chat templates other than the text's, "
               "constrained decoding, other threads/targets than this run's")


def device_thresholds(host: dict[str, float]) -> dict[str, float]:
    """The host gate's thresholds under the device's metric names (bounds take their host metric's threshold)."""
    from .verify import DEVICE_BOUNDS

    out = {dev: host[k] for dev, k in DEVICE_BOUNDS.items() if k in host}
    out.update({k: host[k] for k in ("ppl_rel_change", "top1_agreement", "greedy_common_prefix_mean",
                                     "greedy_common_prefix_min") if k in host})
    return out


def verify_on_device(artifact: str, *, threads: int | None = None, target: str | None = None,
                     thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Recompute the recorded reference positions with this machine's runtime and gate what the record proves.

    Returns a report like verify()'s (`passed`, `metrics`, `thresholds`, `failed`, ...), `on_device: True`."""
    from ..model.artifact import Artifact
    from ..backends import load
    from ..text.tokenizer import Tokenizer
    from .verify import DEVICE_BOUNDS, UPPER_BOUNDS, finish_metrics, greedy_agreement, load_eval_set, thresholds_for

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
    mass = float(ref.mass.mean()) if ref.mass.size else 0.0
    if not mass >= MIN_RECORDED_MASS:
        raise QwenEdgeError(f"{art.path}: the recorded top-{ref.top_ids.shape[1]} hold {mass:.3g} of the reference's "
                            f"probability (< {MIN_RECORDED_MASS}; random weights?): a device check cannot bound KL "
                            "for this artifact; verify it against its PyTorch reference")
    limits = device_thresholds(thresholds_for(art.quant, art.bits_per_weight, thresholds))
    longest = max(ref.lengths + [len(p) + len(g) for p, g in zip(ev.prompts, ref.greedy)])
    acc = DeviceAccumulator()
    prefixes: list[int] = []
    ties: list[int] = []
    rt = load(art.path, target=target, max_context=longest + 8, threads=threads)
    try:
        from ..log import progress

        pos = 0
        nxt = 0
        for w in progress(ev.windows, desc="verify", unit="window"):
            n = len(w)
            rt.reset()
            acc.add_compact(w, rt.prefill_all_logits(w), ref.top_ids[pos:pos + n], ref.top_logits[pos:pos + n],
                    ref.lse[pos:pos + n], ref.next_logprob[nxt:nxt + n - 1])
            pos += n
            nxt += n - 1
        for p, g, margins in zip(ev.prompts, ref.greedy, ref.greedy_margins):
            agreed, tied = greedy_agreement(rt, p, g, margins)
            prefixes.append(agreed)
            ties.append(tied)
        info = rt.info
    finally:
        rt.close()
    m = acc.metrics()
    metrics, failed = finish_metrics(
        {"max_abs_logit_error_bound": m["max_abs_logit_error"], "mean_abs_logit_error_topk": m["mean_abs_logit_error"],
         "kl_mean_bound": m["kl_mean"], "kl_p99_bound": m["kl_p99"], "top1_agreement": m["top1_agreement"],
         "ppl_reference": m["ppl_reference"], "ppl_artifact": m["ppl_artifact"], "ppl_rel_change": m["ppl_rel_change"]},
        prefixes, limits, upper=tuple(UPPER_BOUNDS) + tuple(DEVICE_BOUNDS))
    metrics.update(recorded_mass_mean=mass, recorded_mass_min=float(ref.mass.min()))
    if not ref.host_passed:
        failed.insert(0, "host_verify")
    import platform

    from ..device import hwinfo

    return {
        "passed": not failed,
        "metrics": metrics,
        "thresholds": limits,
        "failed": failed,
        "host_passed": ref.host_passed,
        "host_failed": ref.host_failed,
        "on_device": True,
        "artifact": str(art.path),
        "reference": "recorded reference logits (top-%d per position)" % ref.top_ids.shape[1],
        "format": art.format,
        "quant": art.quant,
        "tokens_evaluated": acc.tokens,
        "windows": len(ev.windows),
        "greedy_tokens": ref.greedy_tokens,
        "greedy_prefixes": prefixes,
        "greedy_ties": ties,
        "quick": ref.quick,
        "eval_text_sha256": ev.sha256,
        "backend": info.backend,
        "machine": platform.machine(),
        "cpu_features": hwinfo.cpu_features(),
        "threads": info.threads,
        "recorded_on": ref.recorded_on,
        "recorded_metrics": parity.get("metrics") if isinstance(parity, dict) else None,
        "covers": COVERS,
        "not_covered": NOT_COVERED,
        "seconds": round(time.perf_counter() - t0, 3),
    }


DEVICE_METRICS = ("max_abs_logit_error_bound", "mean_abs_logit_error_topk", "kl_mean_bound", "kl_p99_bound",
                  "ppl_reference", "ppl_artifact", "ppl_rel_change", "top1_agreement", "greedy_common_prefix_mean",
                  "greedy_common_prefix_min", "recorded_mass_mean", "recorded_mass_min")


def render_device_report(report: dict[str, Any]) -> str:
    """The device gate's report: where it ran, each metric (bounds said as such), what it covers and not."""
    from .verify import DEVICE_BOUNDS, UPPER_BOUNDS

    rec = report.get("recorded_on") or {}
    lines = [f"verify --on-device {report['artifact']} ({report['format']} {report['quant']}) against "
             f"{report['reference']}",
             f"on this device: {report['machine']} ({' '.join(report['cpu_features']) or 'no listed features'}), "
             f"{report['backend']}, {report['threads']} threads; recorded on {rec.get('machine', '?')} "
             f"({' '.join(rec.get('cpu_features') or []) or '?'})",
             f"{report['tokens_evaluated']} tokens in {report['windows']} windows, {len(report['greedy_prefixes'])} "
             f"greedy prompts x {report['greedy_tokens']} tokens, {report['seconds']:.1f}s"]
    for k in DEVICE_METRICS:
        v, t = report["metrics"][k], report["thresholds"].get(k)
        what = " (lower bound)" if k in DEVICE_BOUNDS else ""
        if t is None:
            lines.append(f"  {k + what:<40} {v:>12.6g}")
            continue
        op = "<=" if k in UPPER_BOUNDS or k in DEVICE_BOUNDS else ">="
        lines.append(f"  {k + what:<40} {v:>12.6g}  {op} {t:<10.6g} {'FAIL' if k in report['failed'] else 'ok'}")
    if any(report.get("greedy_ties") or []):
        lines.append(f"  greedy near-ties passed over (reference top-2 margin < tie margin): {report['greedy_ties']}")
    host = "passed" if report["host_passed"] else "FAILED (" + ", ".join(report["host_failed"]) + ")"
    lines.append(f"  {'host verify (recorded)':<40} {host:>12}  {'ok' if report['host_passed'] else 'FAIL'}")
    lines.append(f"  {report['covers']}")
    lines.append(f"  {report['not_covered']}")
    lines.append("PASSED" if report["passed"] else "FAILED: " + ", ".join(report["failed"]))
    return "\n".join(lines)


def run_verify_on_device(artifact: str, as_json: bool = False, threads: int | None = None,
                         target: str | None = None) -> int:
    """`qwen-edge verify ARTIFACT --on-device`: GateFailed (exit 1) when a gate fails."""
    from .verify import emit_gated

    return emit_gated(verify_on_device(artifact, threads=threads, target=target), as_json, render_device_report)
