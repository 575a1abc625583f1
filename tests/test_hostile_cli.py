"""Bad prompts through `qwen-edge generate`: empty, only special tokens, invalid UTF-8, longer than the context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

import hostile


@pytest.fixture(scope="module")
def art(exported) -> Path:
    hostile.require_module("qwen_edge.runtime.generate")
    return exported("tiny-qwen3", "gguf", "q8_0")


def _ok_json(category: str, check: Callable[[dict], bool], *args: str) -> dict:
    """Served input: exit 0, no traceback, a JSON answer that passes `check`; counted clean only if all hold."""
    r = hostile.run_cli(*args)
    doc: dict | None = None
    if r.returncode == 0 and "Traceback" not in r.stderr:
        try:
            doc = json.loads(r.stdout)
        except ValueError:
            doc = None
    ok = isinstance(doc, dict) and bool(check(doc))
    assert hostile.record(category, ok), f"{category}: exit {r.returncode}: {r.stderr[-1500:]} {r.stdout[-500:]}"
    return doc


def test_empty_prompt_with_template_is_served(art):
    """An empty user message is still a conversation: the template gives a non-empty prompt; generation runs."""
    _ok_json("prompt/empty-chat", lambda d: bool(d["prompt_ids"]) and d["stats"]["new_tokens"] <= 2,
             "generate", str(art), "--prompt", "", "--max-new-tokens", "2", "--json")


def test_empty_raw_prompt_rejected(art):
    hostile.expect_cli_rejected("prompt/empty-raw", "generate", str(art), "--prompt", "", "--raw", match="empty")


def test_only_special_tokens(art):
    """Special-token text typed by a user: defined behaviour is exit 0 with a well-formed JSON answer."""
    _ok_json("prompt/only-special", lambda d: isinstance(d["text"], str) and len(d["output_ids"]) <= 2,
             "generate", str(art), "--prompt", "<|im_end|><|endoftext|><think>", "--max-new-tokens", "2", "--json")


def test_prompt_longer_than_context(art):
    hostile.expect_cli_rejected("prompt/too-long", "generate", str(art), "--prompt", "word " * 400,
                                "--max-context", "64", "--max-new-tokens", "2", match="context")


@pytest.mark.parametrize("case", ["invalid-utf8", "not-list", "bad-role", "content-not-string", "empty-list",
                                  "deep",
                                  "missing-file"])
def test_bad_messages_file(art, tmp_path, case):
    p = tmp_path / "m.json"
    data = {
        "invalid-utf8": b'[{"role": "user", "content": "caf\xe9 \xff\xfe"}]',
        "not-list": b'{"role": "user", "content": "hi"}',
        "bad-role": b'[{"role": "root", "content": "hi"}]',
        "content-not-string": b'[{"role": "user", "content": {"$ref": 1}}]',
        "empty-list": b"[]",
        "deep": hostile.deep_json(100_000).encode(),
    }.get(case)
    if data is not None:
        p.write_bytes(data)
    hostile.expect_cli_rejected(f"prompt/messages-{case}", "generate", str(art), "--messages", str(p),
                                "--max-new-tokens", "2")


@pytest.mark.parametrize("args,case", [
    (["--max-new-tokens", "-1"], "negative-max"),
    (["--temperature", "nan"], "nan-temperature"),
    (["--top-p", "7"], "top-p-range"),
    (["--max-context", "0"], "zero-context"),
    (["--threads", "-3"], "negative-threads")])
def test_bad_sampling_flags(art, args, case):
    hostile.expect_cli_rejected(f"prompt/flag-{case}", "generate", str(art), "--prompt", "hi",
                                "--max-new-tokens", "2", *args) if case != "negative-max" else \
        hostile.expect_cli_rejected(f"prompt/flag-{case}", "generate", str(art), "--prompt", "hi", *args)


def test_missing_artifact():
    hostile.expect_cli_rejected("cli/missing-artifact", "generate", "/nonexistent/artifact", "--prompt", "hi")
    hostile.expect_cli_rejected("cli/missing-inspect", "inspect", "/nonexistent/artifact")
    hostile.expect_cli_rejected("cli/inspect-wrong-suffix", "inspect", "/etc/hostname")
