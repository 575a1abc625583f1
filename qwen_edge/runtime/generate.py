"""The one decode loop: prefill, sample, stop ids/strings, streaming text, cancellation, timing stats."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, Union

import numpy as np

from ..errors import QwenEdgeError
from ..text.streaming import held_back
from .sampling import Sampling
from .speculative import Speculative

if TYPE_CHECKING:
    from ..backends.base import Runtime
    from .constrain import Constraint
    from ..text.tokenizer import Tokenizer


class _Event(Protocol):
    def is_set(self) -> bool: ...


Cancel = Union[_Event, Callable[[], bool], None]
"""A cancellation signal polled once per token: a `threading.Event` (set = stop) or a callable returning True."""

FINISH_REASONS = ("stop", "length", "stop_string", "cancelled", "context")


@dataclass
class GenerationStats:
    """Timing and token counts of one generation (seconds; rates are None when undefined)."""

    time_to_first_token_s: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    prefill_tokens: int = 0
    """Prompt tokens actually run through the model this time."""
    reused_tokens: int = 0
    """Prompt tokens already in the KV cache (a chat's shared prefix), not recomputed."""
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    speculative: dict[str, int] | None = None
    """Drafted and accepted tokens when prompt lookup or a draft model ran."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def rate(x: float | None) -> str:
            return "-" if x is None else f"{x:.1f}"

        ttft = "-" if self.time_to_first_token_s is None else f"{self.time_to_first_token_s:.3f} s"
        return (f"prompt {self.prefill_tokens} tok ({rate(self.prefill_tokens_per_s)} tok/s"
                + (f", {self.reused_tokens} reused" if self.reused_tokens else "")
                + f") | generated {self.new_tokens} tok ({rate(self.decode_tokens_per_s)} tok/s) | TTFT {ttft}")


@dataclass
class GenerationResult:
    """What `generate` returns: the ids in and out, the text, why it ended and how long it took."""

    prompt_ids: list[int]
    output_ids: list[int]
    """Generated ids, without the stop id that ended the generation."""
    text: str
    """Decoded output, cut before a stop string."""
    finish_reason: str
    """One of FINISH_REASONS: stop (a stop id), length, stop_string, cancelled, context (the KV cache is full)."""
    stats: GenerationStats = field(default_factory=GenerationStats)
    stop_id: int | None = None


class _StopStringFilter:
    """Holds back text that could be the start of a stop string, so no part of one ever reaches the stream."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        cut = len(self.pending) - held_back(self.pending, self.stops)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _ThinkState:
    """Where the reply stands with a Qwen3 `<think>` block; chooses each token: forced (closing the block at the
    thinking budget), masked by the constraint (after the block), or freely sampled."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int], constraint: Constraint | None,
                 stops: set[int], budget: int | None):
        from ..text.streaming import THINK_END, THINK_START, think_position

        self.tokenizer, self.constraint, self.budget = tokenizer, constraint, budget
        self.stops = sorted(stops)
        self.start_id, self.end_id = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
        self.matcher: Any = None
        self.forced: list[int] = []
        self.thought = 0
        self.state = think_position(tokenizer, prompt)  # "answer", "maybe" (the reply may open a block), "thinking"

    @property
    def grammar_done(self) -> bool:
        """The constraint is complete and there is no stop id to end on: the generation ends here ("stop")."""
        return not self.stops and not self.forced and self.matcher is not None and self.matcher.stopped

    def next_token(self, logits: np.ndarray, sampler: Callable[..., int], context: Sequence[int],
                   draft: int | None = None, q: np.ndarray | None = None) -> int:
        """The next token from `logits` (the model's, at this position); `draft`/`q`: a speculative draft to verify
        (`Sampler.__call__`). Forced tokens (the budget's closing of the block, the grammar's fast-forward span) come
        first, whatever the logits or the draft."""
        if self.forced:
            return self.forced.pop(0)
        if self.state == "thinking" and self.budget is not None and self.thought >= self.budget:
            # the template's own spelling of a closed block: "...\n</think>\n\n" then the answer
            self.forced = self.tokenizer.encode("\n</think>\n\n", parse_special=True)
            self.state = "answer"
            return self.forced.pop(0)
        if self.constraint is not None:
            if self.state == "thinking":  # no stopping inside the block: the constrained answer must follow
                logits = np.array(logits, dtype=np.float32, copy=True)
                logits[[s for s in self.stops if s < logits.shape[-1]]] = -np.inf
            else:
                if self.matcher is None:
                    self.matcher = self.constraint.matcher(self.tokenizer, int(np.shape(logits)[-1]), self.stops)
                if self.state == "answer":
                    ff = self.matcher.ff_tokens()
                    if ff:  # the one continuation the grammar allows, in llguidance's canonical tokens
                        for t in ff:
                            self.matcher.advance(t)
                        self.forced = ff
                        return self.forced.pop(0)
                masked = self.matcher.mask(logits)
                if self.state == "maybe":  # a thinking model may open its block first
                    masked[self.start_id] = np.asarray(logits)[self.start_id]
                logits = masked
        tok = int(sampler(logits, context) if draft is None else sampler(logits, context, draft=draft, q=q))
        self._chosen(tok)
        return tok

    def take_forced(self, limit: int) -> list[int]:
        """Up to `limit` queued forced tokens, taken out of the queue (fast-forward feeds them in one batch)."""
        out, self.forced = self.forced[:max(0, limit)], self.forced[max(0, limit):]
        return out

    def _chosen(self, tok: int) -> None:
        if self.state == "maybe":
            if tok == self.start_id:
                self.state = "thinking"
                return
            self.state = "answer"
        if self.state == "thinking":
            if tok == self.end_id:
                self.state = "answer"
                if self.constraint is not None:  # the template's newlines, then the constrained answer
                    self.forced = self.tokenizer.encode("\n\n", parse_special=True)
            else:
                self.thought += 1
        elif self.matcher is not None and tok not in self.stops:
            self.matcher.advance(tok)


def _is_cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    if is_set is not None:
        return bool(is_set())
    return bool(cancel())  # type: ignore[operator]


def generate(runtime: Runtime, prompt_ids: Sequence[int], *, sampling: Sampling | None = None,
             max_new_tokens: int = 256, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
             tokenizer: Tokenizer | None = None, on_text: Callable[[str], None] | None = None, cancel: Cancel = None,
             cached_prefix: int = 0, constraint: Constraint | None = None,
             thinking_budget: int | None = None, speculative: Speculative | None = None) -> GenerationResult:
    """Run one generation on `runtime` from `prompt_ids`.

    `cached_prefix`: how many leading prompt ids the runtime's KV cache already holds (a chat's shared
    prefix); the cache is rewound to that and only the rest is prefilled. `tokenizer` is needed for text,
    streaming (`on_text` gets UTF-8-complete pieces) and stop strings. `cancel`: an Event or a callable,
    polled per token; Ctrl-C (KeyboardInterrupt) also ends the generation with finish_reason "cancelled"
    and leaves the cache consistent (prompt plus the tokens generated so far).

    `constraint` (qwen_edge.runtime.constrain): the output must match it; its mask applies to the logits before sampling
    (greedy or not), and a stop id is allowed exactly when the grammar accepts. On a thinking model the constraint
    starts after the `<think>` block. `thinking_budget`: after that many thinking tokens the loop itself closes the
    block (`</think>` and the newlines the template puts after it) and the answer follows; with a constraint and no
    budget the budget is 0, so the constrained answer always gets the tokens.
    """
    from ..text.tokenizer import StreamDecoder

    sampling = sampling or Sampling()
    prompt = [int(i) for i in prompt_ids]
    ctx = int(runtime.info.context_length)
    if not prompt:
        raise QwenEdgeError("empty prompt: nothing to generate from")
    if len(prompt) > ctx:
        raise QwenEdgeError(f"prompt has {len(prompt)} tokens but the context holds {ctx} "
                            "(raise --max-context or shorten the prompt)")
    if max_new_tokens < 0:
        raise QwenEdgeError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    if stop_strings and tokenizer is None:
        raise QwenEdgeError("stop strings need a tokenizer")
    stops = {int(i) for i in stop_ids}
    if (constraint is not None or thinking_budget is not None) and tokenizer is None:
        raise QwenEdgeError("constrained decoding and a thinking budget need a tokenizer")
    if thinking_budget is not None and int(thinking_budget) < 0:
        raise QwenEdgeError(f"thinking_budget must be >= 0, not {thinking_budget}")
    if constraint is not None and thinking_budget is None:
        # The output must match the constraint, and a thinking block with no end could take every token first (a
        # weak or random model never closes it): unless a budget says how long to think, the block closes at once.
        thinking_budget = 0
    think = _ThinkState(tokenizer, prompt, constraint, stops, thinking_budget) if tokenizer is not None else None
    sampler = sampling.sampler()
    decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
    filt = _StopStringFilter(list(stop_strings))
    text_parts: list[str] = []
    stats = GenerationStats()
    out: list[int] = []
    finish = "length"
    stop_id: int | None = None

    def emit(piece: str) -> None:
        if piece:
            text_parts.append(piece)
            if on_text is not None:
                on_text(piece)

    reuse = max(0, min(int(cached_prefix), runtime.n_cached, len(prompt) - 1))
    t0 = time.perf_counter()
    good = reuse  # tokens known to be in the cache, consistent with prompt + out
    t_first: float | None = None
    try:
        if runtime.n_cached != reuse:
            runtime.rewind(reuse) if reuse > 0 else runtime.reset()
        stats.reused_tokens = reuse
        stats.prefill_tokens = len(prompt) - reuse
        if _is_cancelled(cancel):
            raise KeyboardInterrupt
        runtime.prefill(prompt[reuse:])
        good = len(prompt)
        t_prefilled = time.perf_counter()
        stats.prefill_s = t_prefilled - t0
        context = list(prompt)
        spec = speculative if speculative is not None else Speculative()
        logits = runtime.logits()
        proposer = spec.proposer(sampling, int(np.shape(logits)[-1]))
        next_tok: int | None = None  # chosen while verifying drafts: emitted next, not sampled again

        def choose(row: np.ndarray, draft: int | None = None, q: np.ndarray | None = None) -> int:
            if think is not None:
                return think.next_token(row, sampler, context, draft, q)
            return int(sampler(row, context) if draft is None else sampler(row, context, draft=draft, q=q))

        def take(tok: int) -> bool:
            """Emit one token; False when the generation ends on it (a stop id, a stop string, the token limit)."""
            nonlocal finish, stop_id
            if tok in stops:
                finish, stop_id = "stop", tok
                return False
            out.append(tok)
            context.append(tok)
            if decoder is not None:
                safe, hit = filt.feed(decoder.push(tok))
                emit(safe)
                if hit:
                    finish = "stop_string"
                    return False
            if len(out) >= max_new_tokens:
                return False
            if _is_cancelled(cancel):  # polled once per token, whether it is fed alone or in a batch
                raise KeyboardInterrupt
            return True

        while len(out) < max_new_tokens:
            if next_tok is None and think is not None and think.grammar_done:
                finish = "stop"
                break
            if next_tok is not None:
                tok, next_tok = next_tok, None
            else:
                tok = choose(logits)
            if t_first is None:
                t_first = time.perf_counter()
            if not take(tok):
                break
            if runtime.n_cached + 1 > ctx:
                finish = "context"
                break
            run = [tok]
            if spec.fast_forward and think is not None and think.forced:
                ended = False
                for t in think.take_forced(min(max_new_tokens - len(out), ctx - runtime.n_cached - 1)):
                    run.append(t)
                    if not take(t):
                        ended = True
                        break
                if ended:
                    break  # ended inside the forced span (nothing of it fed yet)
            room = min(max_new_tokens - len(out), ctx - runtime.n_cached - len(run))
            drafts = proposer.propose(context, room) if proposer is not None and room > 0 and not (
                think is not None and think.forced) else []
            if not drafts:
                runtime.prefill(run)
                logits = runtime.logits()
                good = runtime.n_cached
                continue
            rows = runtime.prefill_all_logits(run + drafts)
            good = len(prompt) + len(out)
            proposer.proposed += len(drafts)
            ended = False
            for i, d in enumerate(drafts):
                t = choose(rows[len(run) - 1 + i], d, proposer.q(i))
                if t != d:
                    next_tok = t
                    break
                proposer.accepted += 1
                if not take(d):
                    ended = True
                    break
            if ended:
                break
            if next_tok is not None:  # drop the rejected drafts; the cache is prompt + out
                runtime.rewind(len(prompt) + len(out))
            else:
                logits = rows[-1]
            good = runtime.n_cached
        if runtime.n_cached > len(prompt) + len(out):  # fed past the end (drafts, a forced span, a stop id)
            runtime.rewind(len(prompt) + len(out))
        good = runtime.n_cached
        stats.speculative = {"proposed": proposer.proposed, "accepted": proposer.accepted} if proposer else None
    except KeyboardInterrupt:
        finish = "cancelled"
        try:
            if runtime.n_cached > good:
                runtime.rewind(good)
        except Exception:
            runtime.reset()
    t_end = time.perf_counter()
    if decoder is not None and finish not in ("stop_string", "cancelled"):  # a cancelled stream ends as it is
        try:
            tail, hit = filt.feed(decoder.flush())
            emit(tail)
            if not hit:
                emit(filt.flush())
            elif finish != "stop":
                finish = "stop_string"
        except KeyboardInterrupt:
            finish = "cancelled"
    stats.new_tokens = len(out)
    stats.total_s = t_end - t0
    if t_first is not None:
        stats.time_to_first_token_s = t_first - t0
        stats.decode_s = t_end - t_first
        if len(out) > 1 and stats.decode_s > 0:
            stats.decode_tokens_per_s = (len(out) - 1) / stats.decode_s
    if stats.prefill_s > 0 and stats.prefill_tokens:
        stats.prefill_tokens_per_s = stats.prefill_tokens / stats.prefill_s
    return GenerationResult(prompt, out, "".join(text_parts), finish, stats, stop_id)
