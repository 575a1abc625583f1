"""`qwen-edge chat` end to end: driven through a pseudo-terminal (type, read the stream, Ctrl-C, /reset, /exit)."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time

import pytest
from conftest import requires_torch

pytestmark = [requires_torch, pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")]

PROMPT = "you> "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02]")


class Pty:
    """A child process on a pseudo-terminal, read until expected text appears."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.master, slave = os.openpty()
        def controlling_tty() -> None:  # a new session whose terminal is the pty, so ^C becomes SIGINT
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # as an interactive shell starts a foreground command: where pytest itself runs with SIGINT ignored (a
            # background job of a non-interactive shell), the child would inherit that and ^C would do nothing
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                     preexec_fn=controlling_tty)
        os.close(slave)
        self.buf = ""
        self.raw = ""
        """Everything the child wrote, escape codes included."""

    def expect(self, text: str, timeout: float = 180) -> str:
        """Read until `text` shows (ANSI codes ignored); returns everything read up to and including it."""
        deadline = time.monotonic() + timeout
        while True:
            plain = ANSI.sub("", self.buf)
            i = plain.find(text)
            if i >= 0:
                self.buf = ""
                return plain[: i + len(text)]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {text!r}; got {plain[-2000:]!r}")
            r, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if r:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"child closed the terminal waiting for {text!r}; got {plain[-2000:]!r}")
                chunk = data.decode("utf-8", errors="replace")
                self.buf += chunk
                self.raw += chunk

    def send(self, s: str) -> None:
        os.write(self.master, s.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(60)
        finally:
            os.close(self.master)


@pytest.fixture
def chat(synth_ckpt):
    ckpt = synth_ckpt("tiny-qwen3")
    env = dict(os.environ, TERM="xterm", PYTHONUNBUFFERED="1")
    env.pop("NO_COLOR", None)
    procs: list[Pty] = []

    def start(*extra: str, no_color: bool = False) -> Pty:
        e = dict(env, NO_COLOR="1") if no_color else env
        p = Pty([sys.executable, "-m", "qwen_edge.cli", "chat", str(ckpt), "--max-context", "512", *extra], e)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.proc.poll() is None:
            os.killpg(p.proc.pid, signal.SIGKILL)
            p.proc.wait()


def test_chat_repl_through_pty(chat):
    t = chat("--max-new-tokens", "12", "--seed", "3", "--no-think")
    banner = t.expect(PROMPT)
    assert "torch hf/fp32" in banner and "/help" in banner
    t.send("Hello, who are you?\r")
    reply = t.expect(PROMPT)
    body = reply.split("Hello, who are you?", 1)[1]
    assert body.strip() and "\ufffd" not in body  # a streamed answer came back
    t.send("/stats\r")
    stats = t.expect(PROMPT)
    assert "time to first token" in stats and "reused from cache    0 tokens" in stats
    t.send("And then?\r")
    t.expect(PROMPT)
    t.send("/stats\r")
    stats = t.expect(PROMPT)
    reused = int(re.search(r"reused from cache\s+(\d+) tokens", stats).group(1))
    assert reused > 0  # the second turn reused the first turn's cache
    t.send("/think\r")
    assert "thinking on" in t.expect(PROMPT)
    t.send("/reset\r")
    assert "conversation cleared" in t.expect(PROMPT)
    t.send("/exit\r")
    assert t.close() == 0


def test_ctrl_c_stops_a_reply_not_the_program(chat):
    t = chat("--max-new-tokens", "2000", "--temperature", "1.0", "--no-think")
    t.expect(PROMPT)
    t.send("Write a very long essay.\r")
    t.expect("essay.")
    time.sleep(1.0)  # let the reply start streaming
    t.send("\x03")
    assert "[stopped]" in t.expect(PROMPT)
    time.sleep(1.0)  # CPython's readline misses a SIGINT that lands before it starts waiting for input
    t.send("\x03")  # Ctrl-C at the prompt only explains how to leave
    assert "Ctrl-D" in t.expect(PROMPT)
    t.send("\x04")  # Ctrl-D: clean exit
    assert t.close() == 0


def test_colors_follow_no_color(chat):
    t = chat("--max-new-tokens", "4", "--no-think", no_color=True)
    t.expect(PROMPT)
    t.send("/help\r")
    out = t.expect(PROMPT)
    assert "/nothink" in out
    assert "\x1b[2m" not in t.raw and "\x1b[33m" not in t.raw and "\x1b[1m" not in t.raw
    t.send("/exit\r")
    assert t.close() == 0


def test_chat_with_piped_stdin(cli, synth_ckpt):
    p = cli("chat", str(synth_ckpt("tiny-qwen3")), "--max-new-tokens", "6", "--no-think",
            input="Hello\n/stats\n/system Be terse.\nAgain\n/reset\n")
    assert p.returncode == 0, p.stderr
    assert "time to first token" in p.stdout and "system prompt set" in p.stdout
    assert "conversation cleared" in p.stdout and "\x1b[" not in p.stdout


def test_a_message_too_long_is_refused_and_the_session_goes_on(chat):
    t = chat("--max-new-tokens", "6", "--seed", "1", "--no-think", "--stats")
    t.expect(PROMPT)
    t.send("Hi\r")
    first = t.expect(PROMPT)
    assert re.search(r"\[prompt \d+ tok .*generated \d+ tok .*TTFT", first)  # --stats: a timing line per reply
    t.send("long " * 600 + "\r")  # ~600 tokens against a 512-token context
    refused = t.expect(PROMPT)
    assert "error: the message needs" in refused and "message not sent" in refused
    t.send("/stats\r")
    assert "reused from cache" in t.expect(PROMPT)  # the first reply's stats survive: the session is intact
    t.send("Hello again\r")
    again = t.expect(PROMPT)
    assert re.search(r"\[prompt \d+ tok \(.*\d+ reused\)", again)  # answered, reusing the first turn's cache
    t.send("/exit\r")
    assert t.close() == 0
