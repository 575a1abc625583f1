"""ChatSession: multi-turn history, KV-cache prefix reuse, context policy, Qwen3 thinking on/off per turn."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from ..errors import QwenEdgeError
from .generate import Cancel, GenerationResult, GenerationStats, generate
from .meta import runtime_stop_ids
from .sampling import Sampling
from .speculative import Speculative
from ..text.streaming import ThinkingSplitter, split_thinking, think_position
from ..text.tokenizer import Tokenizer
from .tools import ToolCall, ToolChoice

if TYPE_CHECKING:
    from ..backends.base import Runtime

ContextPolicy = Literal["drop_oldest", "error"]

CONTEXT_POLICIES = ("drop_oldest", "error")


@dataclass
class TurnResult:
    """One assistant reply: the answer and the thinking apart, why it ended, and what it cost."""

    text: str
    thinking: str | None
    finish_reason: str
    stats: GenerationStats
    prompt_ids: list[int]
    output_ids: list[int]
    dropped_turns: int = 0
    """Oldest user/assistant exchanges removed from the history so this turn fits the context."""
    context_used: int = 0
    """Tokens in the KV cache after the turn."""
    context_length: int = 0
    raw_text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The reply's parsed tool calls (finish_reason "tool_calls"; with "length" the last may be unfinished, its
    arguments cut where the tokens ran out, as OpenAI's); `text` holds none of their markup."""

    @property
    def reused_tokens(self) -> int:
        return self.stats.reused_tokens

    @property
    def prefill_tokens(self) -> int:
        return self.stats.prefill_tokens


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    """A conversation on one Runtime: each turn renders the whole history and prefills only what the cache lacks.

    Not for concurrent use: a second thread calling `send` while a reply is generating gets a QwenEdgeError.
    """

    def __init__(self, runtime: Runtime, tokenizer: Tokenizer, *, system: str | None = None,
                 thinking: bool | None = None, sampling: Sampling | None = None, max_new_tokens: int = 512,
                 context_policy: ContextPolicy = "drop_oldest",
                 stop_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                 thinking_budget: int | None = None):
        if context_policy not in CONTEXT_POLICIES:
            raise QwenEdgeError(f"context_policy {context_policy!r}: expected one of {', '.join(CONTEXT_POLICIES)}")
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.system = system
        self.thinking = thinking
        self.sampling = sampling or Sampling()
        self.max_new_tokens = int(max_new_tokens)
        self.context_policy = context_policy
        self.stop_ids = list(stop_ids) if stop_ids is not None else runtime_stop_ids(runtime, tokenizer)
        self.stop_strings = list(stop_strings)
        if thinking_budget is not None and int(thinking_budget) < 0:
            raise QwenEdgeError(f"thinking_budget must be >= 0, not {thinking_budget}")
        self.thinking_budget = thinking_budget
        """Default cap on each reply's thinking tokens (Qwen3); None: no cap."""
        self.history: list[dict[str, Any]] = []
        """User, assistant (with their `tool_calls`) and tool messages (the system prompt is kept apart in `system`)."""
        self._tools: list[dict[str, Any]] | None = None
        self.last: TurnResult | None = None
        self._cached: list[int] = []
        self._lock = threading.Lock()
        self.speculative: Speculative | None = None
        """Fast-forward, prompt lookup or a draft model for every reply (None: the default, fast-forward only)."""

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "cpu", target: str | None = None,
             max_context: int | None = None, threads: int | None = None, system: str | None = None,
             thinking: bool | None = None, sampling: Sampling | None = None, max_new_tokens: int = 512,
             context_policy: ContextPolicy = "drop_oldest", stop_strings: Sequence[str] = (),
             thinking_budget: int | None = None) -> "ChatSession":
        """Load an artifact (or checkpoint) and its tokenizer and open a session on it (`close()` frees it)."""
        from ..backends import load
        from .meta import model_meta
        from ..text.tokenizer import Tokenizer

        meta = model_meta(path)
        tok = Tokenizer.from_dir(meta.tokenizer_dir)
        rt = load(path, device=device, target=target, max_context=max_context, threads=threads)
        return cls(rt, tok, system=system, thinking=thinking, sampling=sampling, max_new_tokens=max_new_tokens,
                   context_policy=context_policy, stop_ids=meta.stop_ids, stop_strings=stop_strings,
                   thinking_budget=thinking_budget)

    # --- state ------------------------------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict[str, Any]]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + [dict(m) for m in self.history]

    @property
    def context_length(self) -> int:
        return int(self.runtime.info.context_length)

    @property
    def last_prefill_tokens(self) -> int:
        return self.last.stats.prefill_tokens if self.last else 0

    @property
    def last_reused_tokens(self) -> int:
        return self.last.stats.reused_tokens if self.last else 0

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and clear the KV cache."""
        with self._guard():
            self.history.clear()
            self._cached = []
            self.last = None
            self.runtime.reset()

    def close(self) -> None:
        """Free the runtime (its KV cache and weights)."""
        self.runtime.close()

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard(self) -> "_NonBlocking":
        return _NonBlocking(self._lock)

    def render(self, messages: Sequence[dict[str, Any]], thinking: bool | None,
               tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids of a conversation (with its tools) through the chat template, ending with the assistant's turn."""
        from .tools import template_messages

        return self.tokenizer.encode_chat(template_messages(messages), add_generation_prompt=True,
                                          enable_thinking=thinking, tools=tools or None)

    # --- one turn ---------------------------------------------------------------------------------------------
    def _fit(self, new: list[dict[str, Any]], thinking: bool | None,
             tools: Sequence[dict[str, Any]] | None) -> tuple[list[int], int]:
        """Prompt ids for history + new messages, dropping the oldest exchanges while they don't fit; (ids, dropped)."""
        ctx = self.context_length
        alone = self.render(self.messages[: 1 if self.system else 0] + new, thinking, tools)
        if len(alone) >= ctx:
            raise QwenEdgeError(
                f"the message needs {len(alone)} prompt tokens (with the system prompt) but the context holds "
                f"{ctx}: shorten it or raise --max-context")
        dropped = 0
        while True:
            ids = self.render(self.messages + new, thinking, tools)
            if len(ids) + self.max_new_tokens <= ctx or not self.history:
                return ids, dropped  # without room for all max_new_tokens the reply may end with "context"
            if self.context_policy == "error":
                raise QwenEdgeError(f"the conversation needs {len(ids)} + {self.max_new_tokens} tokens; the context "
                                    f"holds {ctx} (context_policy='error')")
            # drop the oldest exchange: the first user message and everything up to the next user message
            cut = 1
            while cut < len(self.history) and self.history[cut]["role"] != "user":
                cut += 1
            del self.history[:cut]
            dropped += 1

    def complete_raw(self, ids: Sequence[int], *, sampling: Sampling | None, max_new_tokens: int,
                     stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None,
                     cancel: Cancel = None) -> GenerationResult:
        """Continue prompt `ids` as they are (no chat template, no history: `/v1/completions`), from the prefix the
        KV cache shares with them (as llama-server's `cache_prompt`). The session then knows what the cache holds,
        so its next turn reuses what it shares and recomputes the rest."""
        with self._guard():
            self.last = None
            return self._generate(list(ids), sampling=sampling, max_new_tokens=max_new_tokens, stop_strings=stop,
                                  on_text=on_text, cancel=cancel)

    def _generate(self, ids: list[int], **kwargs: Any) -> GenerationResult:
        """`generate` on the session's runtime from the cached common prefix; remembers what the cache then holds."""
        if self.runtime.n_cached < len(self._cached):  # someone else rewound the runtime
            self._cached = self._cached[: self.runtime.n_cached]
        elif self.runtime.n_cached > len(self._cached):  # or used it: trust nothing
            self._cached = []
        try:
            res = generate(self.runtime, ids, stop_ids=self.stop_ids, tokenizer=self.tokenizer,
                           cached_prefix=_common_prefix(self._cached, ids), speculative=self.speculative, **kwargs)
        except BaseException:
            self._cached = []
            raise
        self._cached = (res.prompt_ids + res.output_ids)[: self.runtime.n_cached]
        return res

    def _run(self, ids: list[int], *, thinking_budget: int | None, tools: Sequence[dict[str, Any]] | None,
             tool_choice: ToolChoice, response_format: dict[str, Any] | None, sampling: Sampling | None,
             max_new_tokens: int, stop: Sequence[str], on_text: Callable[[str], None] | None,
             on_thinking: Callable[[str], None] | None, cancel: Cancel, dropped: int = 0,
             on_tool_call: Callable[[dict[str, Any]], None] | None = None) -> TurnResult:
        """Generate the reply to prompt `ids`, reusing the cached common prefix; the history is the caller's."""
        from .constrain import from_response_format, tool_call
        from .tools import ToolCallFilter, choice_name, tool_calls_finish

        mode, name = choice_name(tool_choice, tools or [])
        thinking_budget = self.thinking_budget if thinking_budget is None else thinking_budget
        constraint = from_response_format(response_format)
        if mode in ("required", "named") and tools:
            constraint = tool_call(tools, name)
        calls_possible = bool(tools) and mode != "none"
        # only the tools offered: a call to any other is dropped, as OpenAI never returns one; the calls are read
        # as they stream, streamed or not, so a streamed reply says what the finished one does
        held = ToolCallFilter(on_text, [t["function"]["name"] for t in tools or []], on_tool_call) \
            if calls_possible else None
        # A thinking-only template ends the generation prompt inside an open <think> block: the reply starts
        # in the thinking, with no opening tag of its own.
        opened = think_position(self.tokenizer, ids) == "thinking"
        splitter = ThinkingSplitter(held.feed if held else on_text, on_thinking, opened=opened)
        res = self._generate(ids, sampling=sampling or self.sampling, max_new_tokens=max_new_tokens,
                             stop_strings=[*self.stop_strings, *stop], on_text=splitter.feed, cancel=cancel,
                             constraint=constraint, thinking_budget=thinking_budget)
        thought, answer = split_thinking(res.text, opened=opened or None)  # as streamed
        calls: list[ToolCall] = []
        try:
            splitter.finish()
            if held is not None:
                held.finish()
        except KeyboardInterrupt:  # Ctrl-C while printing the tail: the reply is over anyway
            pass
        if held is not None:
            answer, calls = held.content if held.content is not None else answer, held.calls
        finish = tool_calls_finish(calls, res.finish_reason)
        return TurnResult(text=answer, thinking=thought, finish_reason=finish, stats=res.stats,
                          prompt_ids=res.prompt_ids, output_ids=res.output_ids, dropped_turns=dropped,
                          context_used=self.runtime.n_cached, context_length=self.context_length,
                          raw_text=res.text, tool_calls=calls)

    def complete(self, messages: Sequence[dict[str, Any]], *, tools: Sequence[dict[str, Any]] | None = None,
                 tool_choice: ToolChoice = "auto", response_format: dict[str, Any] | None = None,
                 thinking: bool | None = None, thinking_budget: int | None = None, sampling: Sampling | None = None,
                 max_new_tokens: int | None = None, stop: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None, on_thinking: Callable[[str], None] | None = None,
                 cancel: Cancel = None, on_tool_call: Callable[[dict[str, Any]], None] | None = None) -> TurnResult:
        """The next assistant message of an OpenAI-shaped conversation, `history` left alone.

        `messages`: system/user/assistant/tool messages (an assistant's `tool_calls` with JSON-text arguments, a
        tool's `tool_call_id`), rendered by the model's chat template with `tools`. The KV cache keeps the prefix
        this conversation shares with the previous call on the session. `tool_choice` "required" or a named
        function, and `response_format` (json_object, json_schema), are enforced by constrained decoding. A
        conversation longer than the context raises QwenEdgeError. `on_tool_call` gets each tool call as it is
        generated, in OpenAI's streamed `delta.tool_calls` entries (ToolCallFilter).
        """
        from .tools import check_messages, check_tools

        msgs = check_messages(messages)
        checked = check_tools(tools) if tools else None
        with self._guard():
            think = self.thinking if thinking is None else thinking
            budget = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
            ids = self.render(msgs, think, checked if tool_choice != "none" else None)
            if len(ids) >= self.context_length:
                raise QwenEdgeError(f"the conversation needs {len(ids)} prompt tokens but the context holds "
                                    f"{self.context_length}")
            self.last = self._run(ids, thinking_budget=thinking_budget, tools=checked, tool_choice=tool_choice,
                                  response_format=response_format, sampling=sampling, max_new_tokens=budget,
                                  stop=stop, on_text=on_text, on_thinking=on_thinking, cancel=cancel,
                                  on_tool_call=on_tool_call)
            return self.last

    def send(self, text: str, *, thinking: bool | None = None, on_text: Callable[[str], None] | None = None,
             on_thinking: Callable[[str], None] | None = None, cancel: Cancel = None,
             max_new_tokens: int | None = None, sampling: Sampling | None = None,
             tools: Sequence[dict[str, Any]] | None = None, tool_choice: ToolChoice = "auto",
             response_format: dict[str, Any] | None = None, thinking_budget: int | None = None) -> TurnResult:
        """Add a user message, generate the reply (streamed to on_text, thinking to on_thinking), return it.

        `thinking` overrides the session's setting for this turn (Qwen3's enable_thinking). The reply enters
        the history without its thinking, as Qwen3's template does, with its tool calls (`result.tool_calls`; answer
        them with `send_tool_results`). A cancelled reply (Ctrl-C, `cancel`) stays in the history as far as it got.
        """
        if not isinstance(text, str):
            raise QwenEdgeError("a chat message must be a string")
        return self._turn([{"role": "user", "content": text}], thinking=thinking, on_text=on_text,
                          on_thinking=on_thinking, cancel=cancel, max_new_tokens=max_new_tokens, sampling=sampling,
                          tools=tools, tool_choice=tool_choice, response_format=response_format,
                          thinking_budget=thinking_budget)

    def send_tool_results(self, results: Sequence[dict[str, Any]], *, tools: Sequence[dict[str, Any]] | None = None,
                          **kwargs: Any) -> TurnResult:
        """Answer the last reply's tool calls: `results` is [{"tool_call_id": ..., "content": str}, ...], added as
        `role: tool` messages; the model's next reply is returned. `tools` defaults to the last turn's (the same
        system prompt, so the KV cache keeps the whole conversation); other keywords as in `send`."""
        msgs = []
        for n, r in enumerate(results):
            if not isinstance(r, dict) or not isinstance(r.get("content"), str):
                raise QwenEdgeError(f"tool result {n}: expected {{'tool_call_id': ..., 'content': str}}")
            msgs.append({"role": "tool", "tool_call_id": str(r.get("tool_call_id", "")), "content": r["content"]})
        if not msgs:
            raise QwenEdgeError("send_tool_results needs at least one result")
        return self._turn(msgs, tools=self._tools if tools is None else tools, **kwargs)

    def _turn(self, new: list[dict[str, Any]], *, thinking: bool | None = None,
              on_text: Callable[[str], None] | None = None, on_thinking: Callable[[str], None] | None = None,
              cancel: Cancel = None, max_new_tokens: int | None = None, sampling: Sampling | None = None,
              tools: Sequence[dict[str, Any]] | None = None, tool_choice: ToolChoice = "auto",
              response_format: dict[str, Any] | None = None, thinking_budget: int | None = None) -> TurnResult:
        from .tools import check_tools

        checked = check_tools(list(tools)) if tools else None
        with self._guard():
            think = self.thinking if thinking is None else thinking
            budget = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
            saved, self.max_new_tokens = self.max_new_tokens, budget
            try:
                ids, dropped = self._fit(new, think, checked if tool_choice != "none" else None)
            finally:
                self.max_new_tokens = saved
            res = self._run(ids, thinking_budget=thinking_budget, tools=checked, tool_choice=tool_choice,
                            response_format=response_format, sampling=sampling, max_new_tokens=budget, stop=(),
                            on_text=on_text, on_thinking=on_thinking, cancel=cancel, dropped=dropped)
            self._tools = checked
            self.history.extend(new)
            reply: dict[str, Any] = {"role": "assistant", "content": res.text}
            if res.tool_calls:
                reply["tool_calls"] = [c.to_openai() for c in res.tool_calls]
                if res.thinking:  # Qwen3 renders the thinking of a tool-calling turn until the next user query
                    reply["reasoning_content"] = res.thinking
            self.history.append(reply)
            self.last = res
            return res


class _NonBlocking:
    """A lock acquired without waiting: a second thread is refused, not queued."""

    def __init__(self, lock: threading.Lock):
        self.lock = lock

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise QwenEdgeError("ChatSession is already generating in another thread")

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()
