"""`qwen-edge serve --parallel 2` as a real subprocess (GGUF and ONNX): concurrent greedy streams, one joining later,
give the replies each gets alone; a disconnected stream frees its slot while the other goes on; parallel + queue
requests are admitted, one more gets 503; a returning conversation reuses its slot's prefix (usage.cached_tokens); /metrics."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from server_proc import KEY, Server  # noqa: E402  (after the skips: it imports openai)
from test_serve import _leave, _open_stream  # noqa: E402

CONTEXT = 1024
ASK = {"temperature": 0, "max_tokens": 24, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
QUESTIONS = ["hello there", "a much longer question about lighthouses, the sea and the keepers " * 6, "third"]


@pytest.fixture(scope="module", params=["gguf", "onnx"])
def server(request, thinking_artifact, tmp_path_factory):
    s = Server(thinking_artifact(request.param), tmp_path_factory.mktemp("parallel") / "server.log", "--api-key", KEY,
               "--parallel", "2", "--queue", "1", "--max-context", str(CONTEXT))
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


def _ask(server, question: str, history: list | None = None):
    return server.client().chat.completions.create(
        model="m", messages=[*(history or []), {"role": "user", "content": question}], **ASK)


def _concurrently(fns) -> list:
    out: list = [None] * len(fns)

    def run(i: int) -> None:
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_parallel_greedy_streams_equal_solo(server):
    solo = [_ask(server, q).choices[0].message.content for q in QUESTIONS]
    # 3 requests on 2 slots: the third waits in the queue and joins when a slot frees
    together = _concurrently([lambda q=q: _ask(server, q) for q in QUESTIONS])
    assert [r.choices[0].message.content for r in together] == solo
    assert "2 slots" in server.log()


def test_disconnected_stream_frees_its_slot(server):
    before = server.wait_idle()
    conn, resp = _open_stream(server, CONTEXT - 64)  # generates until it is cancelled
    other = _ask(server, QUESTIONS[0])  # served beside it, not after it
    assert other.choices[0].finish_reason in ("stop", "length")
    conn2, _ = _open_stream(server, CONTEXT - 64)
    status, _ = _post_blocked(server)  # 2 slots busy and 1 waiting: a fourth gets 503
    assert status == 503
    _leave(conn)
    _leave(conn2)
    after = server.wait_idle()
    assert not after["busy"] and after["cancelled"] == before["cancelled"] + 2, (before, after)
    counts = [int(n) for n in re.findall(r"cancelled after (\d+) generated tokens", server.log())]
    assert counts and max(counts) < CONTEXT - 64


def _post_blocked(server):
    """With both slots streaming: one request waits (queue 1), the next is refused."""
    waiting = threading.Thread(target=lambda: server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "queued"}], "max_tokens": 2}), daemon=True)
    waiting.start()
    deadline = time.monotonic() + 60
    while server.health()["waiting"] != 1:
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.02)
    status, doc = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "refused"}]})
    assert "2 requests generating" in doc["error"]["message"], doc
    return status, doc


def test_returning_conversation_reuses_its_slot_prefix_and_metrics(server):
    server.wait_idle()
    turns = {"a": "first conversation, first turn", "b": "a different conversation altogether"}
    first = {k: _ask(server, q) for k, q in turns.items()}  # a, then b: on the two slots
    # b comes back first, then a: each to its own slot (the least recently used one would be the other's)
    def history(k: str) -> list:
        return [{"role": "user", "content": turns[k]},
                {"role": "assistant", "content": first[k].choices[0].message.content}]

    second = {k: _ask(server, "and its second turn", history(k)) for k in ("b", "a")}
    for k in turns:
        # most of the first prompt (the template drops the empty think block from the history, and the end of the
        # user's text may tokenize apart); the other conversation's slot shares only the template's first 3 ids
        assert second[k].usage.prompt_tokens_details.cached_tokens >= first[k].usage.prompt_tokens - 5 > 3, \
            (k, first[k].usage, second[k].usage)
    a2 = second["a"]
    a1, b1 = first["a"], first["b"]
    with urllib.request.urlopen(urllib.request.Request(server.base + "/metrics",
                                                       headers={"Authorization": f"Bearer {KEY}"})) as r:
        text = r.read().decode()
    values = {m[0]: float(m[1]) for m in re.findall(r"^(qwen_edge_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}
    assert values["qwen_edge_slots"] == 2 and values["qwen_edge_queue_depth"] == 0
    assert values['qwen_edge_requests_total{result="served"}'] >= 3
    assert values["qwen_edge_prompt_tokens_cached_total"] >= a2.usage.prompt_tokens_details.cached_tokens
    assert values["qwen_edge_generated_tokens_total"] >= sum(r.usage.completion_tokens for r in (a1, b1, a2))
    assert values['qwen_edge_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        values["qwen_edge_time_to_first_token_seconds_count"] >= 3
    assert values["qwen_edge_batch_steps_total"] > 0
    with pytest.raises(urllib.error.HTTPError) as e:  # like the API, the metrics need the key
        urllib.request.urlopen(server.base + "/metrics")
    assert e.value.code == 401


def test_returning_completion_prompt_reuses_its_slot(server):
    """/v1/completions reuses the prefix a slot's cache holds (llama-server's cache_prompt), and picks that slot."""
    server.wait_idle()
    prompts = {"a": "The keeper climbed the stairs of the old lighthouse at dusk",
               "b": "Seven small boats came back into the harbour before the storm"}
    c = server.client()
    first = {k: c.completions.create(model="m", prompt=p, max_tokens=8, temperature=0) for k, p in prompts.items()}
    for k in ("b", "a"):  # b first: the least recently used slot is a's, so only the prefix match finds b's
        again = c.completions.create(model="m", prompt=prompts[k], max_tokens=8, temperature=0)
        assert again.choices[0].text == first[k].choices[0].text
        assert again.usage.prompt_tokens_details.cached_tokens == first[k].usage.prompt_tokens - 1, (k, again.usage)


def test_bad_parallel_is_one_line_exit_2(cli, thinking_artifact):
    r = cli("serve", str(thinking_artifact("gguf")), "--parallel", "0", "--port", "0", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --parallel") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_draft_model_needs_one_slot(cli, thinking_artifact):
    """A draft model holds one sequence: --draft with --parallel 2 is a one-line error, exit 2, before listening."""
    art = str(thinking_artifact("gguf"))
    r = cli("serve", art, "--draft", art, "--parallel", "2", "--port", "0", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --draft") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_default_slots_are_four_on_gguf_and_onnx_cpu(thinking_artifact):
    """--parallel's default: 4 on GGUF and on ONNX on the cpu device (fewer only when the caches would not fit: the
    tiny model's always do), 1 on ONNX on cuda (no batched step there)."""
    from qwen_edge.serve.server import DEFAULT_PARALLEL, default_parallel

    assert default_parallel(thinking_artifact("gguf"), None) == DEFAULT_PARALLEL == 4
    assert default_parallel(thinking_artifact("onnx"), None) == DEFAULT_PARALLEL == 4
    assert default_parallel(thinking_artifact("onnx"), None, device="cuda") == 1
