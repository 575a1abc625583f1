"""Hostile chat templates: the sandbox stops reaches for Python internals, endless loops and megabyte output."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import hostile
from qwen_edge.model.checkpoint import sha256_file

MSGS = [{"role": "user", "content": "hi"}]

ESCAPES = {
    "mro-subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler-globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "lipsum-globals": "{{ lipsum.__globals__['os'] }}",
    "joiner-globals": "{{ joiner.__init__.__globals__ }}",
    "self-context": "{{ self._TemplateReference__context }}",
    "messages-class": "{{ messages.__class__.__base__.__subclasses__() }}",
    "format-attr": "{{ '{0.__class__.__base__}'.format(1) }}",
    "format-map": "{{ '{0.__globals__}'.format_map(namespace) }}",
    "func-code": "{{ raise_exception.__code__ }}",
    "namespace-private": "{% set ns = namespace(_x=1) %}{{ ns }}",
    "namespace-setattr": "{% set ns = namespace() %}{% set ns._secret = 1 %}{{ ns }}",
    "dict-mutation": "{% set d = {} %}{{ d.update({'a': 1}) }}",
    "list-append": "{% set l = [] %}{{ l.append(1) }}",
    "messages-mutation": "{{ messages.append({'role': 'x'}) }}",
    "attr-filter": "{{ messages|attr('__class__') }}",
    "include": "{% include '/etc/passwd' %}",
    "import": "{% import 'os' as os %}",
    "extends": "{% extends '/etc/passwd' %}",
}
RUNAWAY = {
    "nested-loops": "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
    "huge-range": "{% for i in range(10**12) %}x{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "string-repeat": "{{ 'x' * 10**9 }}",
    "list-repeat": "{{ ([1] * 10**9)|length }}",
    "concat-growth": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                     "{% endfor %}{{ ns.s|length }}",
    "power": "{{ 7 ** 9999999 }}",
    "megabytes-out": "{% for i in range(99999) %}{{ 'y' * 1000 }}{% endfor %}",
    "join-growth": "{{ ('x' * 100000)|center(10**9) }}",
    "wordwrap-growth": "{{ ('x ' * 100000)|indent(10**7) }}",
}
BROKEN = {
    "syntax": "{% for %}",
    "unclosed": "{% if x %}",
    "raise": "{{ raise_exception('no system role allowed') }}",
    "undefined-call": "{{ nope() }}",
    "type-error": "{{ 1 + 'a' }}",
    "zero-div": "{{ 1 // 0 }}",
}


def _render(src: str) -> str:
    from qwen_edge.text.tokenizer import render_template

    return render_template(src, {"messages": MSGS, "add_generation_prompt": True})


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_template_escape_blocked(case):
    hostile.expect_rejected(f"template/escape-{case}", lambda: _render(ESCAPES[case]))


@pytest.mark.parametrize("case", sorted(RUNAWAY))
def test_template_runaway_stopped(case):
    hostile.expect_rejected(f"template/runaway-{case}", lambda: _render(RUNAWAY[case]))


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_template_broken_reported(case):
    hostile.expect_rejected(f"template/broken-{case}", lambda: _render(BROKEN[case]))


def test_template_error_is_a_template_error():
    from qwen_edge.text.tokenizer import TemplateError

    with pytest.raises(TemplateError, match="chat template raised: no system"):
        _render(BROKEN["raise"])


def test_sandbox_does_not_leak_between_renders():
    """A refused render leaves nothing behind: the next normal render works and tracing is restored."""
    import sys

    before = sys.gettrace()
    with pytest.raises(Exception):
        _render(RUNAWAY["nested-loops"])
    assert sys.gettrace() is before
    assert _render("{% for m in messages %}{{ m.role }}:{{ m.content }}{% endfor %}") == "user:hi"


def test_hostile_message_content_is_data():
    """Template syntax inside a message is text, never evaluated."""
    from qwen_edge.text.tokenizer import Tokenizer

    tok = Tokenizer.for_family("qwen3")
    text = tok.apply_chat_template([{"role": "user", "content": "{{ cycler.__init__.__globals__ }}"}])
    ok = "{{ cycler.__init__.__globals__ }}" in text and "__builtins__" not in text
    assert hostile.record("template/content-is-data", ok), text


def test_trust_remote_code_never_enabled():
    """No code path turns on `trust_remote_code` (it would run a checkpoint's Python)."""
    root = Path(__file__).resolve().parent.parent / "qwen_edge"
    hits = []
    for p in root.rglob("*.py"):
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"trust_remote_code\s*=\s*(True|1\b|[a-z_]+)", line) and "=False" not in line.replace(" ", ""):
                hits.append(f"{p.relative_to(root.parent)}:{i}: {line.strip()}")
    assert not hits, "trust_remote_code may be enabled:\n" + "\n".join(hits)


# --- an artifact carrying a hostile template (hashes fixed up so the manifest check passes) ---------------------
def _with_template(art: Path, dst: Path, template: bytes) -> Path:
    shutil.copytree(art, dst, copy_function=os.link)
    t = dst / "chat_template.jinja"
    t.unlink()
    t.write_bytes(template)
    m = json.loads((dst / "manifest.json").read_text())
    for e in m["files"]:
        if e["path"] == "chat_template.jinja":
            e["bytes"], e["sha256"] = t.stat().st_size, sha256_file(t)
    m["tokenizer"]["template_sha256"] = sha256_file(t)
    (dst / "manifest.json").unlink()
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.fixture(scope="module")
def gguf_art(exported) -> Path:
    return exported("tiny-qwen3", "gguf", "q8_0")


@pytest.mark.parametrize("case", ["cycler-globals", "nested-loops", "megabytes-out", "invalid-utf8"])
def test_cli_generate_hostile_template(gguf_art, tmp_path, case):
    hostile.require_module("qwen_edge.runtime.generate")
    src = {**ESCAPES, **RUNAWAY}.get(case, "").encode() or b"{{ messages }}\xff\xfe"
    d = _with_template(gguf_art, tmp_path / "a", src)
    hostile.expect_cli_rejected(f"cli/generate-template-{case}", "generate", str(d), "--prompt", "hi",
                                "--max-new-tokens", "2", match="template")
