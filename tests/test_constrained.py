"""Constrained decoding on real runtimes (tiny GGUF and ONNX artifacts, random weights): JSON Schema, regex and Lark
output always matches, greedy and sampled; stop ids only once the grammar accepts; the thinking budget closes the block
at N tokens; bad schema, grammar or regex -> exit 2 with one line. A hypothesis property over generated schemas."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_edge.runtime import constrain
from qwen_edge.runtime.chat import ChatSession
from qwen_edge.runtime.constrain import ConstraintError
from qwen_edge.runtime.generate import generate
from qwen_edge.runtime.sampling import Sampling
from qwen_edge.text.tokenizer import Tokenizer

IM_END, ENDOFTEXT = 151645, 151643
BACKENDS = [("tiny-qwen2", "gguf", "q8_0"), ("tiny-qwen3", "onnx", "int4")]

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "member": {"type": "boolean"}},
    "required": ["name", "age", "tags", "member"], "additionalProperties": False}


@pytest.fixture(scope="module", params=BACKENDS, ids=lambda b: f"{b[1]}-{b[0]}")
def session(request, exported):
    s = ChatSession.load(exported(*request.param), max_context=1024, max_new_tokens=200)
    yield s
    s.close()


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, seed=3)], ids=["greedy", "sampled"])
def test_schema_output_parses_and_validates(session, sampling):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = session.complete([{"role": "user", "content": "Describe someone."}], response_format=fmt, sampling=sampling,
                         thinking=False)
    assert r.finish_reason == "stop", r.raw_text
    jsonschema.validate(json.loads(r.text), PERSON)
    assert session.history == []  # complete() leaves the session's own conversation alone


def test_json_object_and_regex_and_grammar(session):
    r = session.complete([{"role": "user", "content": "JSON please"}], response_format={"type": "json_object"},
                         sampling=Sampling(temperature=1.0, top_k=40, seed=1), thinking=False, max_new_tokens=400)
    # a free object may not close within the budget on random weights: every token is one the grammar takes, and the
    # reply stops exactly when the object is complete (then it parses), else it runs to the limit
    tok, rt = session.tokenizer, session.runtime
    m = constrain.json_object().matcher(tok, rt.info.vocab_size, session.stop_ids)
    for t in r.output_ids:
        m.advance(t)
    assert r.finish_reason == ("stop" if m.accepting else "length") and r.text.startswith("{")
    assert isinstance(json.loads(r.text), dict) if m.accepting else len(r.output_ids) == 400
    ids = tok.encode_chat([{"role": "user", "content": "a code"}], enable_thinking=False)
    out = generate(rt, ids, tokenizer=tok, stop_ids=session.stop_ids, max_new_tokens=40,
                   sampling=Sampling(temperature=1.0, seed=5), constraint=constrain.regex(r"[A-C]{3}-\d{2,4}"))
    assert out.finish_reason == "stop" and re.fullmatch(r"[A-C]{3}-\d{2,4}", out.text), out.text
    # without stop ids the grammar alone ends the output: complete -> "stop"; open-ended -> it runs to the limit
    out = generate(rt, ids, tokenizer=tok, stop_ids=[], max_new_tokens=40, constraint=constrain.regex(r"[A-C]{3}"))
    assert out.finish_reason == "stop" and out.stop_id is None and re.fullmatch(r"[A-C]{3}", out.text), out.text
    out = generate(rt, ids, tokenizer=tok, stop_ids=[], max_new_tokens=12, constraint=constrain.regex(r"[a-c]+"))
    assert out.finish_reason == "length" and re.fullmatch(r"[a-c]+", out.text), out.text
    lark = 'start: "move " DIR " " NUM\nDIR: "north" | "south"\nNUM: /[1-9]/'
    out = generate(rt, ids, tokenizer=tok, stop_ids=session.stop_ids, max_new_tokens=40,
                   constraint=constrain.grammar(lark))
    assert out.finish_reason == "stop" and re.fullmatch(r"move (north|south) [1-9]", out.text), out.text


def test_stop_ids_allowed_exactly_when_the_grammar_accepts():
    tok = Tokenizer.for_family("qwen2_5")
    m = constrain.regex(r"ab(c)?").matcher(tok, 151936, [IM_END, ENDOFTEXT])
    for piece, accepting in (("a", False), ("b", False), ("c", True)):  # accepting: what came before
        allowed = m.allowed()
        assert allowed[[IM_END, ENDOFTEXT]].all() == accepting
        assert not allowed[151644]  # <|im_start|> is never text of the grammar
        logits = np.zeros(151936, dtype=np.float32)
        masked = m.mask(logits)
        assert np.isneginf(masked[~allowed]).all() and (masked[allowed] == 0).all()
        m.advance(tok.encode(piece)[0])
    assert m.stopped and np.flatnonzero(m.allowed()).tolist() == [ENDOFTEXT, IM_END]
    # no stop ids: no end token at all (llguidance would fall back on the tokenizer's own)
    m = constrain.regex(r"a+").matcher(tok, 151936, [])
    m.advance(tok.encode("a")[0])
    assert m.accepting and not m.allowed()[[IM_END, ENDOFTEXT]].any()


def test_thinking_budget_closes_the_block_at_n_tokens(exported, thinking_artifact):
    for arch, fmt, quant in [("tiny-qwen3", "gguf", "q8_0"), ("tiny-qwen3", "onnx", "int4")]:
        s = ChatSession.load(exported(arch, fmt, quant), max_context=512)
        tok = s.tokenizer
        close = tok.encode("\n</think>\n\n")
        prompt = tok.encode_chat([{"role": "user", "content": "think"}]) + tok.encode("<think>\n")
        for n in (0, 7):
            out = generate(s.runtime, prompt, tokenizer=tok, max_new_tokens=n + 12, thinking_budget=n,
                           stop_ids=[], sampling=Sampling())
            assert tok.token_to_id("</think>") not in out.output_ids[:n]
            assert out.output_ids[n: n + len(close)] == close, out.text
        s.close()
    # through the session, on a template that opens the block (every run thinks): the thinking comes back apart, cut
    # at exactly 5 tokens, and the constrained answer follows the forced close
    for fmt in ("gguf", "onnx"):
        with ChatSession.load(thinking_artifact(fmt), max_context=512) as s:
            tok = s.tokenizer
            close = tok.encode("\n</think>\n\n")
            thought: list[str] = []
            r = s.complete([{"role": "user", "content": "think"}], thinking=True, thinking_budget=5,
                           max_new_tokens=30, on_thinking=thought.append, sampling=Sampling(temperature=1.0, seed=2),
                           response_format={"type": "json_schema", "json_schema": {
                               "name": "n", "schema": {"type": "integer", "minimum": 0, "maximum": 99}}})
            assert r.output_ids[5: 5 + len(close)] == close, r.raw_text
            assert r.thinking == tok.decode(r.output_ids[:5]).strip("\n") == "".join(thought)
            assert 0 <= json.loads(r.text) <= 99 and r.finish_reason == "stop"


@pytest.mark.parametrize("flags,needle", [
    (["--json-schema", "{missing}"], "cannot read"),
    (["--json-schema", "{bad_json}"], "not valid JSON"),
    (["--json-schema", "{bad_schema}"], "json_schema"),
    (["--grammar", "{bad_grammar}"], "grammar"),
    (["--regex", "[a-z"], "regex"),
    (["--tools", "{bad_tools}"], "tool"),
    (["--tools", "{tools}", "--tool-choice", "nosuch"], "nosuch"),
    (["--tool-choice", "required"], "--tools"),
    (["--thinking-budget", "-1"], "thinking_budget"),
])
def test_bad_constraint_input_is_one_line_exit_2(cli, exported, tmp_path, flags, needle):
    files = {"missing": tmp_path / "nope.json", "bad_json": tmp_path / "bad.json", "bad_schema": tmp_path / "s.json",
             "bad_grammar": tmp_path / "g.lark", "bad_tools": tmp_path / "t.json", "tools": tmp_path / "tools.json"}
    files["bad_json"].write_text("{not json")
    files["bad_schema"].write_text(json.dumps({"type": "no-such-type"}))
    files["bad_grammar"].write_text("start: undefined_rule\n")
    files["bad_tools"].write_text(json.dumps([{"type": "function", "function": {"description": "no name"}}]))
    files["tools"].write_text(json.dumps([{"type": "function", "function": {"name": "f"}}]))
    args = [f.format(**{k: str(v) for k, v in files.items()}) for f in flags]
    r = cli("generate", str(exported("tiny-qwen2", "gguf", "q8_0")), "--prompt", "hi", "--max-new-tokens", "4",
            *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_cli_json_schema(cli, exported, tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    r = cli("generate", str(exported("tiny-qwen3", "onnx", "int4")), "--prompt", "who?", "--json-schema",
            str(schema), "--temperature", "0.8", "--top-k", "40", "--max-new-tokens", "200", "--json", "--no-think")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["finish_reason"] == "stop"
    jsonschema.validate(json.loads(doc["text"]), PERSON)


def test_unsupported_schema_is_a_constraint_error():
    with pytest.raises(ConstraintError):
        constrain.json_schema({"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(ConstraintError):
        constrain.from_response_format({"type": "xml"})


# --- property: generated schemas within the supported subset, sampled decoding, every output validates ----------
def _leaf() -> st.SearchStrategy[dict]:
    def integer(lo: int, span: int) -> dict:
        return {"type": "integer", "minimum": lo, "maximum": lo + span}

    return st.one_of(
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(integer, st.integers(-1000, 1000), st.integers(0, 5000)),
        st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
                  st.integers(0, 3), st.integers(0, 5)),
        st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=4, unique=True).map(
            lambda xs: {"enum": xs}),
    )


def _schemas() -> st.SearchStrategy[dict]:
    keys = st.text("abcdefgh_", min_size=1, max_size=6)

    def obj(props: dict, req: list[bool]) -> dict:
        names = list(props)
        return {"type": "object", "properties": props, "additionalProperties": False,
                "required": [n for n, r in zip(names, req) if r]}

    def arr(items: dict, lo: int, extra: int) -> dict:
        return {"type": "array", "items": items, "minItems": lo, "maxItems": lo + extra}

    def grow(inner: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
        return st.one_of(
            st.builds(arr, inner, st.integers(0, 1), st.integers(0, 2)),
            st.builds(obj, st.dictionaries(keys, inner, min_size=1, max_size=3), st.lists(st.booleans(), min_size=3,
                                                                                           max_size=3)))

    return st.recursive(_leaf(), grow, max_leaves=5)


def _max_bytes(s: dict) -> int:
    """An upper bound on the bytes of any compact JSON value valid under `s` (each token is at least one byte)."""
    if "enum" in s:
        return max(len(json.dumps(x)) for x in s["enum"])
    t = s["type"]
    if t == "boolean":
        return 5
    if t == "null":
        return 4
    if t == "integer":
        return max(len(str(s["minimum"])), len(str(s["maximum"]))) + 1
    if t == "string":
        return 2 + 6 * s["maxLength"]  # "\uXXXX" is the longest spelling of one character
    if t == "array":
        return 2 + s["maxItems"] * (_max_bytes(s["items"]) + 2)
    return 2 + sum(len(json.dumps(k)) + 4 + _max_bytes(v) for k, v in s["properties"].items())


@pytest.fixture(scope="module")
def property_sessions(exported):
    out = [ChatSession.load(exported(*b), max_context=1024) for b in BACKENDS]
    yield out
    for s in out:
        s.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schemas(), seed=st.integers(0, 2**16), backend=st.integers(0, len(BACKENDS) - 1))
def test_property_generated_schemas_always_validate(property_sessions, schema, seed, backend):
    s = property_sessions[backend]
    budget = _max_bytes(schema) + 2
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    r = s.complete([{"role": "user", "content": "go"}], response_format=fmt, thinking=False, max_new_tokens=budget,
                   sampling=Sampling(temperature=1.0, top_k=50, seed=seed))
    assert r.finish_reason == "stop", (schema, r.raw_text)
    jsonschema.validate(json.loads(r.text), schema)


def test_chat_cli_thinking_budget(cli, exported):
    art = str(exported("tiny-qwen3", "gguf", "q8_0"))
    r = cli("chat", art, "--think", "--thinking-budget", "3", "--max-new-tokens", "12", "--temperature", "0",
            input="hi\n")
    assert r.returncode == 0, r.stderr
    r = cli("chat", art, "--thinking-budget", "-2", input="hi\n")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: thinking_budget must be >= 0, not -2"]


@pytest.mark.parametrize("fmt, quant", [("gguf", "q8_0"), ("onnx", "int4")])
def test_constraint_with_thinking_on_and_no_budget_still_holds(exported, fmt, quant):
    # Qwen3 with thinking on: a random model opens <think> and never closes it; without a budget the block must close
    # at once so the constrained answer gets the tokens (before: the whole budget went to thinking, no JSON, no call)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}}, "required": ["tz"],
        "additionalProperties": False}}}]
    fmt_ = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with ChatSession.load(exported("tiny-qwen3", fmt, quant), max_context=1024, max_new_tokens=120) as s:
        for sampling in (Sampling(), Sampling(temperature=1.0, seed=5)):
            r = s.complete([{"role": "user", "content": "Describe someone."}], response_format=fmt_, thinking=True,
                           sampling=sampling)
            jsonschema.validate(json.loads(r.text), PERSON)
            r = s.complete([{"role": "user", "content": "Time?"}], tools=tools, tool_choice="required",
                           thinking=True, sampling=sampling)
            # "required" allows several calls, which a random model may go on writing to the token limit: every
            # call it finished parses (one cut by the limit is the last, finish_reason "length")
            assert r.tool_calls and all(c.name == "get_time" for c in r.tool_calls)
            for c in r.tool_calls[:-1] if r.finish_reason == "length" else r.tool_calls:
                json.loads(c.arguments)


# --- schemas as the frameworks send them: no additionalProperties means closed -------------------------------------
OPEN_CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                              "days": {"type": "integer", "minimum": 1, "maximum": 7}},
             "required": ["city", "days"]}  # no additionalProperties: what LangChain, instructor and Pydantic send


def test_objects_without_additional_properties_are_closed():
    pydantic_style = {"$defs": {"Pet": {"properties": {"kind": {"type": "string"}}, "required": ["kind"],
                                        "title": "Pet", "type": "object"}},
                      "properties": {"pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
                                     "meta": {"type": "object", "additionalProperties": True},
                                     "both": {"allOf": [{"properties": {"a": {"type": "integer"}}},
                                                        {"properties": {"b": {"type": "integer"}}}]}},
                      "type": "object"}
    closed = constrain.close_objects(pydantic_style)
    assert closed["additionalProperties"] is False and closed["$defs"]["Pet"]["additionalProperties"] is False
    assert closed["properties"]["meta"]["additionalProperties"] is True  # said open: stays open
    # allOf members stay open at their level (closing each would refuse the other's key)
    assert all("additionalProperties" not in m for m in closed["properties"]["both"]["allOf"])
    assert "additionalProperties" not in pydantic_style  # the caller's schema is not changed
    deep: dict = {"type": "object"}
    for _ in range(5000):  # too deep to walk: a ConstraintError (400 in the server), not a RecursionError
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(ConstraintError, match="nested too deeply"):
        constrain.close_objects(deep)
    tok = Tokenizer.for_family("qwen2_5")
    for c, extra_ok in ((constrain.json_schema(OPEN_CITY), False),
                        (constrain.json_schema({**OPEN_CITY, "additionalProperties": True}), True),
                        (constrain.json_object(), True)):
        m = c.matcher(tok, 151936, [IM_END])
        for t in tok.encode('{"city": "Rome", "days": 3'):
            m.advance(t)
        assert m.allowed()[tok.encode(",")[0]] == extra_ok  # a further key may follow only where the schema says so


@pytest.mark.parametrize("kind", ["tool_call", "json_schema"])
def test_framework_schemas_always_close_on_random_weights(session, kind):
    """20 sampled replies in a row: a tool call (tool_choice required) and a json_schema answer whose object schema has
    no additionalProperties always complete, with the declared keys only (before: about one in three ran to the
    token limit appending keys, the call's markup left in the text)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": OPEN_CITY}}]
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": OPEN_CITY}}
    for seed in range(20):
        kw = dict(tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}}) \
            if kind == "tool_call" else dict(response_format=fmt)
        r = session.complete([{"role": "user", "content": "Weather?"}], thinking=False, max_new_tokens=60,
                             sampling=Sampling(temperature=1.0, seed=seed), **kw)
        doc = json.loads(r.tool_calls[0].arguments if kind == "tool_call" else r.text)
        assert set(doc) == {"city", "days"}, (seed, r.raw_text)
        assert r.finish_reason == ("tool_calls" if kind == "tool_call" else "stop"), (seed, r.raw_text)
        assert "<tool_call>" not in r.text
