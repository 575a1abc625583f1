"""`qwen-edge serve` safe on a laptop, each finding of issue 25 against a real server subprocess (tiny GGUF and ONNX):
only application/json bodies (415), only loopback Host names on a loopback bind (403; --allow-host), operator caps
(stop strings, max_tokens, a deadline), hostile values that are 400 naming the field and never a 5xx, a forced call
out of tokens in OpenAI's shape, a warning when bound beyond loopback without a key; in process: request parsing off
the event loop and bounded, prefill cancellable between chunks."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from server_proc import KEY, Server  # noqa: E402  (after the skips: it imports openai)

CAP = 48
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
HI = [{"role": "user", "content": "hi"}]
APP = "http://app.example:8000"


@pytest.fixture(scope="module", params=["gguf", "onnx"])
def server(request, thinking_artifact, tmp_path_factory):
    s = Server(thinking_artifact(request.param), tmp_path_factory.mktemp("harden") / "server.log", "--api-key", KEY,
               "--max-tokens", str(CAP), "--max-stop", "4", "--allow-host", "my.box", "--allow-origin", APP,
               "--max-context", "4096")
    s.fmt = request.param  # type: ignore[attr-defined]
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None
        ) -> tuple[int, dict]:
    """One request with exactly these headers (http.client adds Host only when not given)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request(method, path, body, {"Authorization": f"Bearer {KEY}", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else {}


def chat(server, body: dict | bytes, **headers: str) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return raw(server, "POST", "/v1/chat/completions", data, {"Content-Type": "application/json", **headers})


# --- a web page cannot drive it ------------------------------------------------------------------------------------
def test_only_json_bodies(server):
    body = json.dumps({"messages": HI, "max_tokens": 2}).encode()
    # text/plain (and form posts) are what a page may send cross-origin without a CORS preflight
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        before = server.health()["served"]
        status, doc = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": kind} if kind else {})
        assert status == 415 and doc["error"]["code"] == "unsupported_media_type", (kind, doc)
        assert server.health()["served"] == before  # nothing generated
    status, doc = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200 and doc["choices"][0]["message"]["role"] == "assistant"


def test_only_loopback_host_names(server):
    port = server.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}", ""):
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            status, doc = raw(server, method, path, json.dumps({"messages": HI}).encode() if method == "POST" else
                              None, {"Host": host, "Content-Type": "application/json"})
            assert status == 403 and doc["error"]["code"] == "host_not_allowed", (host, path, doc)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LocalHost", "my.box", f"my.box:{port}"):
        status, doc = raw(server, "GET", "/v1/models", headers={"Host": host})
        assert status == 200 and doc["data"], (host, doc)


def test_only_loopback_or_allowed_origins(server):
    """A browser's Origin must be a page on this machine or one --allow-origin names (403 before anything runs);
    no Origin (curl, the SDKs) is fine. CORS headers go to the allowed origins only, loopback pages included."""
    body = json.dumps({"messages": HI, "max_tokens": 1, **NO_THINK}).encode()
    for origin in ("http://evil.example", "https://localhost.evil.example", "http://127.0.0.1.nip.io", "null",
                   "http://localhost@evil.example", "http://app.example", "file://", APP + ".evil"):
        before = server.health()["served"]
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("OPTIONS", "/v1/models")):
            status, doc = raw(server, method, path, body if method == "POST" else None, {
                "Origin": origin, "Content-Type": "application/json", "Access-Control-Request-Method": "GET"})
            assert status == 403 and doc["error"]["code"] == "origin_not_allowed", (origin, method, doc)
        assert server.health()["served"] == before  # nothing generated
    for origin in ("http://localhost:5173", "https://127.0.0.1", "http://[::1]:3000", APP, None):
        status, doc = chat(server, body, **({"Origin": origin} if origin else {}))
        assert status == 200 and doc["choices"][0]["message"]["role"] == "assistant", (origin, doc)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for origin, cors in ((APP, APP), ("http://localhost:5173", None)):
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        r = conn.getresponse()
        r.read()
        assert r.getheader("access-control-allow-origin") == cors, (origin, r.status)
    conn.close()


# --- what one request may hold -------------------------------------------------------------------------------------
def test_operator_caps(server):
    for body, param, says in [
        ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop", "--max-stop"),
        ({"messages": HI, "stop": ["x" * 257]}, "stop", "256 characters"),
        ({"messages": HI, "max_tokens": CAP + 1}, "max_tokens", f"at most {CAP} tokens"),
        ({"messages": HI, "max_completion_tokens": 10**6}, "max_completion_tokens", "--max-tokens"),
    ]:
        status, doc = chat(server, body)
        assert status == 400 and doc["error"]["param"] == param and says in doc["error"]["message"], (body, doc)
    status, doc = chat(server, {"messages": HI, "stop": ["a", "b", "c", "d"], "max_tokens": CAP})
    assert status == 200
    # no max_tokens: the cap, not the whole context (random weights run on to any limit)
    status, doc = chat(server, {"messages": HI, "temperature": 1.0, "seed": 1, **NO_THINK})
    assert status == 200 and doc["usage"]["completion_tokens"] == CAP
    assert doc["choices"][0]["finish_reason"] == "length"
    r = server.client().completions.create(model="m", prompt="x", max_tokens=CAP)
    assert r.usage.completion_tokens == CAP
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="m", prompt="x", max_tokens=CAP + 1)


# a schema nested 480 levels (960 JSON levels: the server's parser still reads it; walking it recursively would not)
DEEP = '{"type": "object", "properties": {"a": ' * 480 + '{"type": "object"}' + "}}" * 480

HOSTILE = [
    # (raw body, status, param)
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + b"1" * 5000 + b"}", 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": -' + b"1" * 5000 + b"}", 400, "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e999}', 400, "repetition_penalty"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', 400, "seed"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": -5}', 200, None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 18446744073709551615}', 200, None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 1e-308, "top_p": 0.5}',
     200, None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 5e-324, "top_k": 40}',
     200, None),
    (json.dumps({"messages": [HI[0], {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 900 + "]" * 900}}]}]}).encode(),
     400, "messages[1]"),
    (('{"messages": %s, "tools": [{"type": "function", "function": {"name": "f", "parameters": %s}}]}'
      % (json.dumps(HI), DEEP)).encode(), 400, "tools"),
    (('{"messages": %s, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": %s}}}'
      % (json.dumps(HI), DEEP)).encode(), 400, "response_format"),
    (json.dumps({"messages": HI, "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}]}).encode(),
     400, "tools"),
]


def test_hostile_values_are_400_naming_the_field_never_5xx(server):
    for body, want, param in HOSTILE:
        status, doc = chat(server, body)
        assert status == want, (body[:120], doc)
        if want == 400:
            assert doc["error"]["param"] == param and doc["error"]["type"] == "invalid_request_error", (body[:120], doc)
    status, doc = raw(server, "POST", "/v1/completions", json.dumps({"prompt": [10**30], "max_tokens": 2}).encode(),
                      {"Content-Type": "application/json"})
    assert status == 400 and doc["error"]["param"] == "prompt", doc
    h = server.health()
    assert h["status"] == "ok"


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}]


def streamed(server, **kw) -> tuple[dict, list]:
    """A streamed chat completion added up as clients do: (message, finish_reason, usage-less) and its tool-call
    chunks as (chunk number, delta), checking OpenAI's shape: each call opens with index, id, type and name and
    arguments "", then only argument pieces."""
    content, calls, finish, tool_chunks = "", {}, None, []
    chunks = list(server.client().chat.completions.create(**kw, stream=True))
    for n, chunk in enumerate(chunks):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                tool_chunks.append((n, d))
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name and d.function.arguments == "", d
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None and d.function.arguments, d
                    calls[d.index]["arguments"] += d.function.arguments
    assert chunks[-1].choices[0].finish_reason == finish and not chunks[-1].choices[0].delta.tool_calls
    return {"content": content or None, "calls": list(calls.values()), "finish": finish}, tool_chunks


def whole(server, **kw) -> dict:
    ch = server.client().chat.completions.create(**kw).choices[0]
    assert "<tool_call>" not in (ch.message.content or "")
    return {"content": ch.message.content or None, "finish": ch.finish_reason, "calls": [
        {"name": c.function.name, "arguments": c.function.arguments} for c in ch.message.tool_calls or []]}


def test_tool_calls_stream_as_openai_chunks_and_add_up_to_the_reply(server):
    """Streamed tool calls are sent as they are generated, chunked as OpenAI does (the name with arguments "" first,
    then argument pieces), and add up to exactly the non-streamed reply (calls, content, finish_reason) for
    tool_choice required, named and auto on several seeds, a call cut by max_tokens included."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    seen = set()
    for seed in range(4):
        for choice, max_tokens in (("required", CAP), (named, CAP), ("auto", 24), ("required", 16)):
            kw = dict(model="m", messages=HI, tools=WEATHER, tool_choice=choice, max_tokens=max_tokens, seed=seed,
                      temperature=1.0, extra_body=NO_THINK)
            one = whole(server, **kw)
            s, tool_chunks = streamed(server, **kw)
            assert s == one, (choice, seed, s, one)
            seen.add(one["finish"])
            if choice != "auto" and max_tokens == CAP:  # "required" may go on to a second call, cut by the cap
                assert one["calls"] and not one["content"] and one["finish"] in ("tool_calls", "length"), one
                assert one["finish"] == "tool_calls" or choice == "required", one
                args = [n for n, d in tool_chunks if d.id is None]
                assert len(args) > 1 and tool_chunks[0][0] < args[0], tool_chunks  # the name first, then pieces
                json.loads(one["calls"][0]["arguments"])
    assert {"tool_calls", "length"} <= seen, seen


def test_forced_call_out_of_tokens_is_openai_shaped(server):
    """tool_choice required and max_tokens too small for the call: finish_reason length, no markup in content
    (before: the raw <tool_call> text came back as content), an unfinished call only once its name was generated
    (as OpenAI's at "length"), streamed the same."""
    for max_tokens in (6, 12):
        kw = dict(model="m", messages=HI, tools=WEATHER[:1], tool_choice="required", max_tokens=max_tokens,
                  extra_body=NO_THINK, temperature=0)
        one = whole(server, **kw)
        assert one["finish"] == "length" and not one["content"], one
        assert all(c["name"] == "get_weather" for c in one["calls"]), one
        assert streamed(server, **kw)[0] == one


def test_deadline_ends_a_long_generation(thinking_artifact, tmp_path):
    """--timeout: a generation that would run for seconds ends at its deadline with what it generated,
    finish_reason length, and the model is free for the next request."""
    s = Server(thinking_artifact("gguf"), tmp_path / "server.log", "--timeout", "1", "--max-context", "4096")
    try:
        assert s.post("/v1/chat/completions", {"messages": HI, "max_tokens": 2}, key=None)[0] == 200  # warm
        status, doc = s.post("/v1/chat/completions", {"messages": HI, "max_tokens": 3000, "temperature": 1.0,
                                                      "seed": 1, **NO_THINK}, key=None)
        assert status == 200 and doc["choices"][0]["finish_reason"] == "length", doc
        assert 0 < doc["usage"]["completion_tokens"] < 3000
        assert "stopped at its deadline (1 s, --timeout)" in s.log()
        status, doc = s.post("/v1/chat/completions", {"messages": HI, "max_tokens": 2}, key=None)
        assert status == 200 and doc["usage"]["completion_tokens"] <= 2
    finally:
        assert s.stop() == 0, s.log()


def test_beyond_loopback_without_a_key_warns(thinking_artifact, tmp_path):
    s = Server(thinking_artifact("gguf"), tmp_path / "server.log", "--host", "0.0.0.0")
    try:
        assert "without an API key" in s.log()
        # bound beyond loopback, any Host name is answered (the operator chose the network)
        status, doc = raw(s, "GET", "/v1/models", headers={"Host": "my-laptop.lan"})
        assert status == 200
    finally:
        assert s.stop() == 0, s.log()
    s = Server(thinking_artifact("gguf"), tmp_path / "server2.log", "--api-key", KEY)
    try:
        assert "without an API key" not in s.log()
    finally:
        assert s.stop() == 0, s.log()


# --- in process: parsing off the event loop, prefill between chunks ------------------------------------------------
@pytest.fixture(scope="module")
def engine(thinking_artifact):
    from qwen_edge.runtime.chat import ChatSession
    from qwen_edge.serve.engine import Engine
    from qwen_edge.serve.protocol import Limits

    session = ChatSession.load(thinking_artifact("gguf"), max_context=2048)
    e = Engine(session, "tiny", queue=2, limits=Limits(parse_timeout_s=0.5))
    yield e
    e.close()


def test_parsing_runs_off_the_event_loop_and_is_bounded(engine, monkeypatch):
    import time

    from starlette.testclient import TestClient

    from qwen_edge.serve import app as serve

    threads: list[str] = []
    real = serve.parse_chat_request

    def spy(body, config, limits):
        threads.append(threading.current_thread().name)
        if body.get("slow"):
            time.sleep(1.5)  # a schema that takes long to compile
        return real(body, config, limits)

    monkeypatch.setattr(serve, "parse_chat_request", spy)
    with TestClient(serve.create_app(engine), base_url="http://127.0.0.1") as client:
        r = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert threads[-1].startswith("qwen-edge-parse")  # not the event loop's thread
        r = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1, "slow": True,
                                                       "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
        assert "0.5 s" in r.json()["error"]["message"]


def test_prefill_stops_between_chunks(engine):
    """A request cancelled while its (long) prompt is prefilled frees the model after one chunk; the KV cache is
    rewound to what it held before."""
    from qwen_edge.runtime.generate import generate
    from qwen_edge.serve.protocol import PREFILL_CHUNK

    rt = engine.session.runtime  # the engine's chunked view of the runtime
    inner = rt._runtime
    calls: list[int] = []
    real = inner.prefill
    inner.prefill = lambda ids: (calls.append(len(ids)), real(ids))[1]
    try:
        rt.reset()
        rt.stopped = lambda: bool(calls)  # the client goes away once the first chunk is in
        prompt = engine.session.tokenizer.encode("lighthouse " * 1000)[: 4 * PREFILL_CHUNK]
        out = generate(rt, prompt, max_new_tokens=4)
        assert out.finish_reason == "cancelled" and out.output_ids == []
        assert calls == [PREFILL_CHUNK] and rt.n_cached == 0
        rt.stopped = lambda: False
        calls.clear()
        out = generate(rt, prompt, max_new_tokens=2)
        assert calls[:4] == [PREFILL_CHUNK] * 4 and out.finish_reason == "length"  # (then decode steps)
    finally:
        del inner.prefill
        rt.stopped = lambda: False


def test_api_key_compared_in_constant_time(engine, monkeypatch):
    from starlette.testclient import TestClient

    from qwen_edge.serve import app as serve

    compared: list[tuple[bytes, bytes]] = []
    real = serve.hmac.compare_digest
    monkeypatch.setattr(serve.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    with TestClient(serve.create_app(engine, api_key="s3cret"), base_url="http://127.0.0.1") as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cre"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert compared == [(b"s3cre", b"s3cret"), (b"s3cret", b"s3cret")]


@pytest.mark.parametrize("flags, needle", [(["--max-tokens", "0"], "--max-tokens"), (["--max-stop", "0"], "--max-stop"),
                                           (["--timeout", "nan"], "--timeout"), (["--timeout", "-1"], "--timeout")])
def test_bad_caps_are_one_line_exit_2(cli, thinking_artifact, flags, needle):
    r = cli("serve", str(thinking_artifact("gguf")), "--port", "0", *flags, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_allow_origin_star_allows_every_origin(engine):
    """--allow-origin '*': any page may call (with CORS headers); without it the same page gets 403."""
    from starlette.testclient import TestClient

    from qwen_edge.serve import app as serve

    for origins, status in ((["*"], 200), ([], 403)):
        with TestClient(serve.create_app(engine, allow_origins=origins), base_url="http://127.0.0.1") as client:
            r = client.get("/v1/models", headers={"Origin": "http://evil.example"})
            assert r.status_code == status, (origins, r.text)
            assert (r.headers.get("access-control-allow-origin") == "*") == bool(origins), r.headers
