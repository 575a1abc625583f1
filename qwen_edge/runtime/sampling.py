"""Token sampling from logits in numpy: greedy, temperature, top-k, top-p, min-p, repetition, presence and frequency
penalties, seeded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import QwenEdgeError

TOP_P_PROBE = 1024
"""Candidates taken first for top-p without top-k; the full sort runs only if they hold less than top_p."""


@dataclass
class Sampling:
    """How the next token is chosen from the logits (applied in this order: penalties, temperature, top-k, top-p,
    min-p)."""

    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it before the softmax."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = no limit)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p (1 = no limit)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's (0 = off)."""
    repetition_penalty: float = 1.0
    """HF/CTRL penalty on tokens already in the context: positive logits divided, negative multiplied (1 = off)."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token this generation has already produced (0 = off)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time this generation has produced it (0 = off)."""
    seed: int | None = 0
    """Seed of the numpy Generator; the same seed, logits and settings give the same tokens."""

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise QwenEdgeError(f"sampling: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_generation_config(cls, gen: Mapping[str, Any], **overrides: Any) -> "Sampling":
        """Defaults from a generation_config.json (greedy when do_sample is false), then non-None overrides."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        if gen.get("do_sample", True) and gen.get("temperature") is not None:
            for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
                v = gen.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    values[k] = type(getattr(cls, k))(v) if k != "top_k" else int(v)
        values.update({k: v for k, v in overrides.items() if v is not None and k in known})
        return cls(**values)

    def sampler(self) -> "Sampler":
        return Sampler(self)


def apply_repetition_penalty(logits: np.ndarray, context_ids: Iterable[int], penalty: float) -> np.ndarray:
    """A copy of logits with every id seen in the context penalized (HF semantics: once per distinct id)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0:
        return out
    if isinstance(context_ids, (list, tuple, np.ndarray)):
        ids = np.asarray(context_ids, dtype=np.int64).reshape(-1)
    else:
        ids = np.fromiter((int(i) for i in context_ids), dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < out.shape[-1])]
    if ids.size:
        # no np.unique (it cost more than the rest, per token): every copy of a repeated id reads the unpenalized
        # value and writes the same penalized one, so each id is still penalized once
        vals = out[ids]
        out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def candidate_probs(logits: np.ndarray, s: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities summing to 1) that survive temperature, top-k, top-p and min-p, most likely first."""
    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(over="ignore"):  # relative to the best logit: a tiny temperature gives -inf, never inf - inf
        x = (x - x.max()) / s.temperature
    n = x.shape[-1]
    total: float | None = None  # the full softmax's normalizer, when only a probe of candidates is kept
    if 0 < s.top_k < n:
        ids = np.argpartition(-x, s.top_k - 1)[: s.top_k]
    elif s.top_p < 1.0 and n > TOP_P_PROBE:
        ids = np.argpartition(-x, TOP_P_PROBE - 1)[:TOP_P_PROBE]
        # exact: the probe suffices when its own mass (under the full softmax) already reaches top_p
        m = x.max()
        full = float(np.exp(x - m).sum())
        if np.exp(x[ids] - m).sum() / full < s.top_p:
            ids = np.arange(n)
        else:
            total = full
    else:
        ids = np.arange(n)
    vals = x[ids]
    order = np.argsort(-vals, kind="stable")
    ids, vals = ids[order], vals[order]
    p = np.exp(vals - vals[0])
    p /= p.sum() if total is None else total  # vals[0] is the max, so total shares its reference
    if s.top_p < 1.0:
        # keep tokens while the mass before them is below top_p (the first token always stays)
        before = np.cumsum(p) - p
        keep = int(np.count_nonzero(before < s.top_p))
        ids, p = ids[:keep], p[:keep]
        p = p / p.sum()
    if s.min_p > 0.0:
        keep = p >= s.min_p * p[0]
        ids, p = ids[keep], p[keep]
        p = p / p.sum()
    return ids, p


class Sampler:
    """Stateful sampler: owns the seeded Generator so one generation's draws are reproducible."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)
        self.counts: dict[int, int] = {}  # how often this sampler has chosen each token (presence/frequency)

    def __call__(self, logits: np.ndarray, context_ids: Iterable[int] = (), *, draft: int | None = None,
                 q: np.ndarray | None = None) -> int:
        """The next token. With `draft` (speculative decoding), the token chosen at a drafted position: greedy takes
        the argmax as always; sampled keeps the draft with probability min(1, p(draft) / q(draft)) (one uniform
        draw from this sampler's seeded stream, none when p(draft) >= q(draft) or p(draft) = 0), else draws (one
        more uniform) from max(0, p - q) normalized; `q` None is a one-hot draft (prompt
        lookup): keep it with p(draft), else draw from p without it. p is this sampler's own distribution (the same
        penalties, temperature, top-k, top-p, min-p as a plain step), so the result is distributed as p."""
        s = self.sampling
        x = np.asarray(logits)
        if x.ndim != 1 or x.size == 0:
            raise QwenEdgeError(f"sampling needs a 1-D logits vector, got shape {x.shape}")
        if s.repetition_penalty != 1.0:
            x = apply_repetition_penalty(x, context_ids, s.repetition_penalty)
        if (s.presence_penalty or s.frequency_penalty) and self.counts:
            x = np.array(x, dtype=np.float32, copy=True)
            ids = np.fromiter(self.counts, dtype=np.int64)
            n = np.fromiter(self.counts.values(), dtype=np.float32)
            keep = ids < x.shape[-1]
            x[ids[keep]] -= s.presence_penalty + s.frequency_penalty * n[keep]
        tok = self._choose(x) if draft is None else self._verify(x, int(draft), q)
        self.counts[tok] = self.counts.get(tok, 0) + 1
        return tok

    def _verify(self, x: np.ndarray, draft: int, q: np.ndarray | None) -> int:
        if self.sampling.greedy:
            return int(np.argmax(x))
        ids, p = candidate_probs(x, self.sampling)
        hit = np.flatnonzero(ids == draft)
        p_d = float(p[hit[0]]) if hit.size else 0.0
        q_d = 1.0 if q is None else float(q[draft]) if draft < q.shape[-1] else 0.0
        if p_d > 0.0 and (q_d <= p_d or self.rng.random() * q_d < p_d):
            return draft
        rest = p.copy()
        if q is None:
            rest[hit] = 0.0
        else:
            qq = np.zeros(ids.size)
            inside = ids < q.shape[-1]
            qq[inside] = q[ids[inside]]
            rest = np.maximum(rest - qq, 0.0)
        total = rest.sum()
        if total <= 0.0:  # only reachable through rounding: p and q agree everywhere
            return draft if p_d > 0.0 else int(ids[0])
        k = int(np.searchsorted(np.cumsum(rest / total), self.rng.random(), side="right"))
        return int(ids[min(k, ids.size - 1)])

    def _choose(self, x: np.ndarray) -> int:
        s = self.sampling
        if s.greedy:
            return int(np.argmax(x))
        ids, p = candidate_probs(x, s)
        if ids.size == 1:
            return int(ids[0])
        r = self.rng.random()
        k = int(np.searchsorted(np.cumsum(p), r, side="right"))
        return int(ids[min(k, ids.size - 1)])
