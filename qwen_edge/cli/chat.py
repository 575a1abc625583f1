"""`qwen-edge chat`: a terminal REPL over ChatSession with streaming, dimmed thinking and slash commands."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from ..runtime.chat import ChatSession, TurnResult
from ..errors import QwenEdgeError, first_line

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /stats          timings and token counts of the last reply
  /think          turn Qwen3 thinking on       /nothink   turn it off
  /system TEXT    set the system prompt (no TEXT: show it; /system - clears it)
  /exit           quit (also /quit, Ctrl-D); Ctrl-C stops a reply"""


class Style:
    """ANSI styles, or nothing when the output is not a terminal or NO_COLOR is set."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def _wrap(self, code: str, s: str) -> str:
        return f"\x1b[{code}m{s}\x1b[0m" if self.enabled else s

    def dim(self, s: str) -> str:
        return self._wrap("2", s)

    def bold(self, s: str) -> str:
        return self._wrap("1", s)

    def note(self, s: str) -> str:
        return self._wrap("33", s)

    def start_dim(self) -> str:
        return "\x1b[2m" if self.enabled else ""

    def end(self) -> str:
        return "\x1b[0m" if self.enabled else ""


def use_color(stream: TextIO) -> bool:
    return "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb" and _isatty(stream)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_stats(r: TurnResult | None) -> str:
    if r is None:
        return "no reply yet"
    s = r.stats

    def num(x: float | None, unit: str, fmt: str = ".1f") -> str:
        return "-" if x is None else f"{x:{fmt}} {unit}"

    lines = [
        f"time to first token  {num(s.time_to_first_token_s, 's', '.3f')}",
        f"prefill              {s.prefill_tokens} tokens, {num(s.prefill_tokens_per_s, 'tok/s')}",
        f"reused from cache    {s.reused_tokens} tokens",
        f"decode               {s.new_tokens} tokens, {num(s.decode_tokens_per_s, 'tok/s')}",
        f"context used         {r.context_used} / {r.context_length} tokens",
        f"finished by          {r.finish_reason}" + (f" (dropped {r.dropped_turns} oldest turns)"
                                                     if r.dropped_turns else ""),
    ]
    return "\n".join(lines)


class ChatRepl:
    """Reads lines, runs turns, prints streamed replies; slash commands manage the session."""

    def __init__(self, session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, *, label: str = "",
                 stats: bool = False):
        self.s = session
        self.stats = stats
        """Print a one-line timing after each reply (`--stats`)."""
        self.stdin, self.out, self.err = stdin, stdout, stderr
        self.tty = _isatty(stdin) and _isatty(stdout)
        self.style = Style(use_color(stdout))
        self.label = label
        template = session.tokenizer.chat_template or ""
        self.has_thinking = "enable_thinking" in template

    # --- output -------------------------------------------------------------------------------------------
    def write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def info(self, s: str) -> None:
        self.write(self.style.note(s) + "\n")

    def read_line(self) -> str | None:
        """A line of input without its newline; None at end of input."""
        if self.tty:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            try:
                prompt = "\001\x1b[1m\002you> \001\x1b[0m\002" if self.style.enabled else "you> "
                return input(prompt)
            except EOFError:
                return None
        line = self.stdin.readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    # --- commands -----------------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False means exit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.s.reset()
            self.info("conversation cleared")
        elif name == "/stats":
            self.write(format_stats(self.s.last) + "\n")
        elif name in ("/think", "/nothink"):
            if not self.has_thinking:
                self.info("this model's chat template has no thinking mode")
            else:
                self.s.thinking = name == "/think"
                self.info(f"thinking {'on' if self.s.thinking else 'off'}")
        elif name == "/system":
            if not arg:
                self.info(f"system prompt: {self.s.system!r}" if self.s.system else "no system prompt")
            else:
                self.s.system = None if arg == "-" else arg
                self.info("system prompt cleared" if arg == "-" else "system prompt set")
        elif name in ("/help", "/?"):
            self.write(HELP + "\n")
        else:
            self.info(f"unknown command {name} (/help lists them)")
        return True

    # --- a turn -------------------------------------------------------------------------------------------
    def turn(self, text: str) -> None:
        st = self.style
        state = {"thinking": False, "any": False}

        def on_thinking(piece: str) -> None:
            if not state["thinking"]:
                self.write(st.start_dim() + ("" if st.enabled else "<think>\n"))
                state["thinking"] = True
            self.write(piece)

        def on_text(piece: str) -> None:
            if state["thinking"]:
                self.write(("" if st.enabled else "\n</think>") + st.end() + "\n\n")
                state["thinking"] = False
            state["any"] = True
            self.write(piece)

        try:
            r = self.s.send(text, on_text=on_text, on_thinking=on_thinking)
        except KeyboardInterrupt:  # outside the decode loop (e.g. while rendering): nothing was generated
            self.write(st.end() + "\n")
            self.info("[stopped]")
            return
        except QwenEdgeError as e:  # refused (too long for the context, a template error): the session goes on
            if state["thinking"] or state["any"]:
                self.write(st.end() + "\n")
            self.err.write(f"error: {first_line(e)}\n")
            self.err.flush()
            self.info("[message not sent; the conversation is unchanged]")
            return
        if state["thinking"]:
            self.write(("" if st.enabled else "\n</think>") + st.end())
        self.write("\n")
        if r.dropped_turns:
            self.info(f"[dropped the {r.dropped_turns} oldest exchange(s) to fit the {r.context_length}-token context]")
        if r.finish_reason == "cancelled":
            self.info("[stopped]")
        elif r.finish_reason == "context":
            self.info("[context full: reply cut; older turns are dropped on the next message]")
        elif r.finish_reason == "length":
            self.info(f"[reply cut at {r.stats.new_tokens} tokens: raise --max-new-tokens]")
        if self.stats:
            self.info(f"[{r.stats.summary()}]")

    def loop(self) -> int:
        if self.tty:
            think = "" if not self.has_thinking else f", thinking {'off' if self.s.thinking is False else 'on'}"
            self.write(self.style.dim(f"{self.label}{think}. /help for commands, Ctrl-D to quit.") + "\n")
        while True:
            try:
                line = self.read_line()
            except KeyboardInterrupt:
                self.write("\n")
                self.info("(Ctrl-D or /exit to quit)")
                continue
            if line is None:
                if self.tty:
                    self.write("\n")
                return 0
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line.strip()):
                        return 0
                    continue
                self.turn(line)
            except KeyboardInterrupt:
                self.write(self.style.end() + "\n")
                self.info("[stopped]")


def run_chat_cli(args: Any) -> int:
    from ..runtime.meta import model_meta
    from .options import close_speculative, load_with_speculative, sampling_from_args
    from ..text.tokenizer import Tokenizer

    meta = model_meta(args.artifact)
    tok = Tokenizer.from_dir(meta.tokenizer_dir)
    sampling = sampling_from_args(args, meta.generation_config, default_greedy=False)
    if _isatty(sys.stdout):
        from ..log import say

        say(f"loading {args.artifact} ...")
    runtime, spec = load_with_speculative(args, tok)
    try:
        session = ChatSession(runtime, tok, system=args.system, thinking=args.think, sampling=sampling,
                              max_new_tokens=args.max_new_tokens, stop_ids=meta.stop_ids,
                              stop_strings=args.stop or (), thinking_budget=args.thinking_budget)
        session.speculative = spec
        i = runtime.info
        label = f"{os.path.basename(os.path.normpath(str(args.artifact)))}: {i.backend} {i.format}/{i.quant} " \
                f"on {i.device}, {i.threads} threads, context {i.context_length}"
        return ChatRepl(session, sys.stdin, sys.stdout, sys.stderr, label=label,
                        stats=bool(getattr(args, "stats", False))).loop()
    finally:
        runtime.close()
        close_speculative(spec)
