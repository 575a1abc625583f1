"""Tool calls on real runtimes (tiny GGUF and ONNX artifacts, random weights): required and named choices always parse,
markup never reaches on_text, results go back as role: tool messages with the KV prefix reused; parsing and the
streaming hold-back on their own; the generate CLI's --tools."""

from __future__ import annotations

import json

import jsonschema
import pytest

from qwen_edge.runtime.chat import ChatSession
from qwen_edge.errors import QwenEdgeError
from qwen_edge.runtime.sampling import Sampling
from qwen_edge.runtime.tools import MAX_JSON_DEPTH, ToolCallFilter, check_messages, parse_tool_calls

BACKENDS = [("tiny-qwen2", "gguf", "q8_0"), ("tiny-qwen3", "onnx", "int4")]
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}}},
]


@pytest.fixture(scope="module", params=BACKENDS, ids=lambda b: f"{b[1]}-{b[0]}")
def session(request, exported):
    s = ChatSession.load(exported(*request.param), max_context=2048, max_new_tokens=120, thinking=False)
    yield s
    s.close()


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, top_k=50, seed=7)], ids=["greedy", "sampled"])
def test_required_tool_choice_gives_a_parsed_call(session, sampling):
    streamed: list[str] = []
    r = session.complete([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, tool_choice="required",
                         sampling=sampling, on_text=streamed.append)
    assert r.finish_reason == "tool_calls" and r.tool_calls, r.raw_text
    for c in r.tool_calls:
        assert c.id.startswith("call_") and len(c.id) == 29
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == c.name)
        jsonschema.validate(json.loads(c.arguments), schema)
        assert c.to_openai() == {"id": c.id, "type": "function", "function": {"name": c.name,
                                                                               "arguments": c.arguments}}
    assert "<tool_call>" not in r.text and not any("tool_call" in p for p in streamed)


def test_named_tool_choice_calls_that_tool(session):
    r = session.complete([{"role": "user", "content": "time?"}], tools=TOOLS,
                         tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.finish_reason == "tool_calls" and [c.name for c in r.tool_calls] == ["get_time"]
    assert json.loads(r.tool_calls[0].arguments)["tz"] in ("UTC", "CET")


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_tool_round_trip_reuses_the_kv_prefix(session):
    session.reset()
    first = session.send("Weather in Rome for 3 days?", tools=TOOLS, tool_choice="required")
    assert first.tool_calls and session.history[-1]["tool_calls"][0]["id"] == first.tool_calls[0].id
    second = session.send_tool_results([{"tool_call_id": c.id, "content": json.dumps({"temp_c": 21})}
                                        for c in first.tool_calls], max_new_tokens=8)
    # Everything the re-rendered conversation shares with the cache is reused: the first prompt (Qwen3's template
    # drops an empty think block, "<think>", "\n\n", "</think>", "\n\n", from past turns) and the generated call as
    # far as the template re-renders it with the same tokens (the grammar lets the model spell "get_time" as
    # "get"+"_t"+"ime", the tokenizer as "get"+"_time"). Only the rest and the <tool_response> block are prefilled.
    common = _common(first.prompt_ids + first.output_ids, second.prompt_ids)
    assert second.reused_tokens == common >= len(first.prompt_ids) - 4
    assert second.prefill_tokens == len(second.prompt_ids) - common < len(first.output_ids) + 30
    text = session.tokenizer.decode(second.prompt_ids)
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in text
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool", "assistant"]
    # complete() on the same conversation reuses the cache the same way and leaves history as it was
    before = list(session.history)
    msgs = session.messages + [{"role": "user", "content": "thanks"}]
    third = session.complete(msgs, tools=TOOLS, max_new_tokens=4)
    assert third.reused_tokens == _common(second.prompt_ids + second.output_ids, third.prompt_ids)
    assert third.reused_tokens >= len(second.prompt_ids) - 4 and session.history == before


def test_auto_streams_exactly_the_content(session):
    """Under "auto" the reply may or may not call a tool: either way the streamed text is exactly the content and
    carries no markup; a call that was made is one of the offered tools, with arguments that parse."""
    for seed in range(6):
        streamed: list[str] = []
        r = session.complete([{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice="auto", max_new_tokens=12,
                             sampling=Sampling(temperature=1.0, seed=seed), on_text=streamed.append)
        assert "".join(streamed) == r.text and "<tool_call>" not in r.text
        assert r.finish_reason == "tool_calls" if r.tool_calls and r.finish_reason != "length" else not r.tool_calls
        assert r.finish_reason in ("stop", "length", "tool_calls")
        for c in r.tool_calls:
            assert c.name in {t["function"]["name"] for t in TOOLS}
            assert isinstance(json.loads(c.arguments), dict)


def test_parse_tool_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "parameters": {"y": [2, {"z": "}"}]}}\n</tool_call>')
    rest, calls = parse_tool_calls(text)
    assert rest == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("a", {"x": 1}), ("b", {"y": [2, {"z": "}"}]})]
    assert len({c.id for c in calls}) == 2
    # a block that is not a call is dropped (OpenAI never returns markup as content); so is one whose arguments
    # are not an object
    assert parse_tool_calls("<tool_call>\nnot json\n</tool_call>") == ("", [])
    assert parse_tool_calls('<tool_call>\n{"name": "a", "arguments": "{}"}\n</tool_call>') == ("", [])
    _, calls = parse_tool_calls('<tool_call>\n{"name": "a", "arguments": {}}')  # stopped before the closing tag
    assert [(c.name, c.arguments) for c in calls] == [("a", "{}")]
    # out of tokens inside the arguments: the call keeps what it had, as OpenAI's do at finish_reason "length"
    _, calls = parse_tool_calls('<tool_call>\n{"name": "a", "arguments": {"x": "ab')
    assert [(c.name, c.arguments) for c in calls] == [("a", '{"x": "ab')]


GOOD = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'


UTC = '{"tz": "UTC"}'
DEEP = '{"a": ' * MAX_JSON_DEPTH + "{"


@pytest.mark.parametrize("text, content, calls", [
    # a malformed first block (never closed) does not swallow the valid one after it
    ('<tool_call>\n{"name": "get_weather", "argu\n' + GOOD, "", [UTC]),
    # a call to a tool that was not offered is no call, and its markup is no content
    ('Sure.\n<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>\n' + GOOD, "Sure.", [UTC]),
    # arguments nested past MAX_JSON_DEPTH stop there, no RecursionError; the next block is read on its own
    ('<tool_call>\n{"name": "get_time", "arguments": ' + DEEP * 80 + "1" + "}" * 5000 + "}\n</tool_call>\n"
     + GOOD + "\nbye", "bye", ['{"a": ' * MAX_JSON_DEPTH, UTC]),
    # text, a call, markup cut before the name is known (no call), or inside the arguments (an unfinished one)
    ("a\n" + GOOD + '\n<tool_call>\n{"name": "get_', "a", [UTC]),
    ("a " + GOOD + ' b <tool_call>\n{"name": "get_time", "arguments": {"tz": "U', "a\nb", [UTC, '{"tz": "U']),
    # markers inside argument strings end the block all the same, streamed or not
    ('<tool_call>{"name": "get_time", "arguments": {"tz": "<tool_call>' + GOOD, "", ['{"tz": "', UTC]),
])
def test_each_block_parses_on_its_own_and_streams_as_it_returns(text, content, calls):
    rest, parsed = parse_tool_calls(text, ["get_time"])
    assert rest == content and [c.arguments for c in parsed] == calls and {c.name for c in parsed} == {"get_time"}
    for size in (1, 3, 7, 50):  # streamed in pieces of any size: the stream says what the finished reply does
        out: list[str] = []
        deltas: list[dict] = []
        f = ToolCallFilter(out.append, ["get_time"], deltas.append)
        for i in range(0, len(text), size):
            f.feed(text[i: i + size])
        f.finish()
        assert "".join(out) == rest and not any("<tool" in p for p in out), (size, out)
        assert _accumulate(deltas) == [("get_time", a) for a in calls], size


def _accumulate(deltas: list[dict]) -> list[tuple[str, str]]:
    """OpenAI's streamed tool-call deltas added up as clients do; each call opens with its id, type and name and
    arguments "" (checked here)."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        fn = d["function"]
        if d["index"] not in calls:
            assert d["id"].startswith("call_") and d["type"] == "function" and fn["arguments"] == "", d
            calls[d["index"]] = [fn["name"], ""]
        else:
            assert set(d) == {"index", "function"} and set(fn) == {"arguments"} and fn["arguments"], d
            calls[d["index"]][1] += fn["arguments"]
    assert list(calls) == list(range(len(calls)))
    return [(n, a) for n, a in calls.values()]


def test_tool_calls_stream_as_they_are_generated(session):
    """A forced call's name and argument pieces reach on_tool_call while tokens are still being generated (the
    cancel check runs once per token: each delta is tagged with how many ran), not all at the end."""
    polls = [0]

    def cancel() -> bool:
        polls[0] += 1
        return False

    deltas: list[tuple[int, dict]] = []
    r = session.complete([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, tool_choice="required",
                         sampling=Sampling(temperature=1.0, seed=3), cancel=cancel,
                         on_tool_call=lambda d: deltas.append((polls[0], d)))
    assert r.finish_reason == "tool_calls" and r.tool_calls, r.raw_text
    assert _accumulate([d for _, d in deltas]) == [(c.name, c.arguments) for c in r.tool_calls]
    arg_steps = [n for n, d in deltas if "id" not in d]
    assert len(arg_steps) > 1 and deltas[0][0] <= arg_steps[0] < arg_steps[-1] < polls[0] - 1, (deltas, polls)


def test_tool_call_markup_never_streams():
    out: list[str] = []
    f = ToolCallFilter(out.append)
    text = "".join(["Sure", ", <to", "ol_c", "all>\n{\"name\"", ": \"a\"}\n</tool_call>"])
    for piece in ["Sure", ", <to", "ol_c", "all>\n{\"name\"", ": \"a\"}\n</tool_call>"]:
        f.feed(piece)
    assert "".join(out) == "Sure,"  # the space before the markup is held back too: it is not content
    f.finish(parse_tool_calls(text)[0])
    assert "".join(out) == "Sure,"
    out.clear()
    f = ToolCallFilter(out.append)
    for piece in ["a <to", "y> b"]:
        f.feed(piece)
    f.finish()
    assert "".join(out) == "a <toy> b"


def test_one_message_validator_for_cli_library_and_server(cli, exported, tmp_path):
    """An assistant message with content null and tool_calls (what OpenAI's client sends back) is taken by the CLI's
    --messages as by the library and the server; developer is a system message; deep arguments are refused."""
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "time?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    checked = check_messages(msgs)
    assert checked[0]["role"] == "system" and checked[2]["content"] is None
    f = tmp_path / "msgs.json"
    f.write_text(json.dumps(msgs))
    r = cli("generate", str(exported("tiny-qwen2", "gguf", "q8_0")), "--messages", str(f), "--max-new-tokens", "3",
            "--json")
    assert r.returncode == 0, r.stderr
    assert "<tool_response>\n12:00\n</tool_response>" in _prompt_text(exported, json.loads(r.stdout))
    deep = [dict(msgs[2], tool_calls=[{"id": "c", "type": "function", "function": {
        "name": "get_time", "arguments": "[" * 100 + "]" * 100}}])]
    with pytest.raises(QwenEdgeError, match="deeper"):
        check_messages(msgs[:2] + deep)
    f.write_text(json.dumps(msgs[:2] + deep))
    r = cli("generate", str(exported("tiny-qwen2", "gguf", "q8_0")), "--messages", str(f), "--max-new-tokens", "3")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "deeper" in r.stderr, r.stderr


def _prompt_text(exported, doc: dict) -> str:
    from qwen_edge.text.tokenizer import Tokenizer

    return Tokenizer.from_dir(exported("tiny-qwen2", "gguf", "q8_0")).decode(doc["prompt_ids"])


def test_bad_messages_and_tools_are_refused(session):
    with pytest.raises(QwenEdgeError, match="role"):
        check_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(QwenEdgeError, match="tool_choice"):
        session.complete([{"role": "user", "content": "x"}], tools=TOOLS, tool_choice={"function": {"name": "nope"}})
    with pytest.raises(QwenEdgeError, match="context"):
        session.complete([{"role": "user", "content": "word " * 3000}])


def test_cli_tools_required(cli, exported, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    art = str(exported("tiny-qwen2", "gguf", "q8_0"))
    r = cli("generate", art, "--prompt", "weather?", "--tools", str(tools), "--tool-choice", "required", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["finish_reason"] == "tool_calls" and doc["tool_calls"][0]["id"].startswith("call_")
    assert "<tool_call>" not in doc["text"]
    r = cli("generate", art, "--prompt", "time?", "--tools", str(tools), "--tool-choice", "get_time")
    assert r.returncode == 0, r.stderr
    call = json.loads(r.stdout.strip().splitlines()[-1])
    assert call["function"]["name"] == "get_time" and "<tool_call>" not in r.stdout
