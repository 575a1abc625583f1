"""More than one token per model pass, exact: fast-forward under a constraint, prompt lookup and a draft model.

`generate(..., speculative=Speculative(...))` uses this module; the decode loop stays the one in generate.py.

- **Fast-forward** (on by default under a constraint): when the grammar allows exactly one continuation (llguidance's
  `compute_ff_tokens`: JSON keys, punctuation, the `<tool_call>` wrapper and a forced function name) those tokens are
  taken as they are, never sampled. Forced spans *always* take llguidance's canonical tokens, with fast-forward on
  or off, so the ids are the same either way: off feeds them one decode step each, on feeds them in one batch (the
  gain). Token-by-token masked decoding could otherwise pick any tokenization of the forced bytes.
- **Prompt lookup** (`lookup=N`): the last n tokens (n = `ngram` down to 1) are searched earlier in the prompt and
  reply; up to N tokens that followed the most recent match are the draft.
- **Draft model** (`draft=RUNTIME`): a smaller runtime with the same vocabulary (any backend) proposes
  `draft_tokens` tokens.

Drafts are verified in one pass of the target (`Runtime.prefill_all_logits`: logits at every drafted position) and
the rejected ones are rolled back (`Runtime.rewind`). The decision at each position is the normal sampler's
(`Sampler.__call__` with `draft=`, same penalties, temperature, top-k, top-p, min-p and constraint mask):
greedy takes the argmax, so a draft survives exactly when it is the token plain decoding would choose; sampled uses
speculative sampling's rule (accept with min(1, p/q), else draw from max(0, p - q) normalized; a lookup draft is
one-hot q: accept with p(d), else draw from p without d), which leaves the output distributed as the target's.

Greedy output is token-identical to plain decoding as long as the batched pass gives the same logits as single
decode steps: bit-identical on llama.cpp's quantized (q8_0/q4_0) kernels on AVX2; llama.cpp f16 rounds differently
for several rows (~2e-4 on the tiny models); onnxruntime int4 at accuracy_level 4 differs by up to 0.05 (logit std
0.6) on the 0.5B for M > 1 (one-row passes are bit-identical; accuracy_level 1 differs by 7e-6), so there greedy
output drifts from one-step decoding (README: "Where greedy identity holds").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import QwenEdgeError
from .sampling import Sampling, candidate_probs

if TYPE_CHECKING:
    from ..backends.base import Runtime


@dataclass
class Speculative:
    """How `generate` emits more than one token per pass (see the module docstring)."""

    fast_forward: bool = True
    """Feed the tokens a constraint forces in one batch (the ids are the same either way)."""
    lookup: int = 0
    """Draft up to this many tokens from n-gram matches in the prompt and reply (0 = off)."""
    ngram: int = 3
    """Longest n-gram prompt lookup matches (it tries ngram, ngram-1, ..., 1)."""
    draft: Any = None
    """A draft `Runtime` sharing the target's vocabulary (None = no draft model); the caller owns and closes it."""
    draft_tokens: int = 4
    """Tokens the draft model proposes per step."""
    draft_cached: list[int] = field(default_factory=list, repr=False, compare=False)
    """The ids the draft's KV cache holds (kept across generations, so a chat's next turn reuses them)."""

    def __post_init__(self) -> None:
        if isinstance(self.lookup, bool) or not isinstance(self.lookup, int) or self.lookup < 0:
            raise QwenEdgeError(f"lookup must be a number of tokens >= 0, not {self.lookup!r}")
        if not isinstance(self.ngram, int) or self.ngram < 1:
            raise QwenEdgeError(f"ngram must be >= 1, not {self.ngram!r}")
        if not isinstance(self.draft_tokens, int) or self.draft_tokens < 1:
            raise QwenEdgeError(f"draft_tokens must be >= 1, not {self.draft_tokens!r}")
        if self.lookup and self.draft is not None:
            raise QwenEdgeError("use either prompt lookup or a draft model, not both")

    def proposer(self, sampling: Sampling, vocab: int) -> "Proposer | None":
        if self.draft is not None:
            return DraftProposer(self.draft, self.draft_tokens, sampling, vocab, self.draft_cached)
        if self.lookup:
            return LookupProposer(self.lookup, self.ngram)
        return None


class Proposer:
    """Proposes draft tokens after `context`; `q(i)` is the draft's distribution at draft i (None: one-hot)."""

    max_tokens: int = 0
    accepted = proposed = 0

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        raise NotImplementedError

    def q(self, i: int) -> np.ndarray | None:
        return None


def lookup_draft(context: Sequence[int], k: int, ngram: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the context's last n tokens (longest n
    first, n <= ngram); [] when none occurs."""
    ctx = np.asarray(context, dtype=np.int64)
    n_ctx = ctx.size
    for n in range(min(ngram, n_ctx - 1), 0, -1):
        tail = ctx[n_ctx - n:]
        # windows starting at s = 0 .. n_ctx - n - 1 (the tail itself excluded)
        win = np.lib.stride_tricks.sliding_window_view(ctx[: n_ctx - 1], n)
        hits = np.flatnonzero((win == tail).all(axis=1))
        if hits.size:
            s = int(hits[-1]) + n
            return ctx[s: s + k].tolist()
    return []


class LookupProposer(Proposer):
    def __init__(self, k: int, ngram: int):
        self.max_tokens, self.ngram = k, ngram

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        return lookup_draft(context, min(k, self.max_tokens), self.ngram)


class DraftProposer(Proposer):
    """A draft runtime kept in step with the context (its own KV cache, rewound to the shared prefix)."""

    def __init__(self, runtime: Runtime, k: int, sampling: Sampling, vocab: int, cached: list[int]):
        self.rt, self.max_tokens, self.sampling, self.vocab = runtime, k, sampling, vocab
        self.ids = cached  # what the draft's cache holds (the Speculative's list, updated in place)
        # the draft's own draws come from their own stream, so the target's sampler sees the same draws per decision
        self.rng = np.random.default_rng(None if sampling.seed is None else [int(sampling.seed), 1])
        self._q: list[np.ndarray | None] = []
        del self.ids[runtime.n_cached:]  # someone else rewound it: what is left is still ours

    def _choose(self, logits: np.ndarray) -> tuple[int, np.ndarray | None]:
        if self.sampling.greedy:
            return int(np.argmax(logits)), None
        ids, p = candidate_probs(logits, self.sampling)
        q = np.zeros(self.vocab, dtype=np.float64)
        keep = ids < self.vocab
        q[ids[keep]] = p[keep]
        tok = int(ids[min(int(np.searchsorted(np.cumsum(p), self.rng.random(), side="right")), ids.size - 1)])
        return tok, q

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        k = min(k, self.max_tokens, int(self.rt.info.context_length) - len(context))
        self._q = []
        if k <= 0:
            return []
        ctx = list(context)
        common = 0
        limit = min(len(self.ids), self.rt.n_cached, len(ctx) - 1)
        while common < limit and self.ids[common] == ctx[common]:
            common += 1
        if self.rt.n_cached != common:
            self.rt.rewind(common)
        self.rt.prefill(ctx[common:])
        drafts: list[int] = []
        for j in range(k):
            tok, q = self._choose(self.rt.logits())
            if tok >= self.vocab:
                break
            drafts.append(tok)
            self._q.append(q)
            if j < k - 1:
                self.rt.decode(tok)
        self.ids[:] = (ctx + drafts)[: self.rt.n_cached]
        return drafts

    def q(self, i: int) -> np.ndarray | None:
        return self._q[i] if i < len(self._q) else None
