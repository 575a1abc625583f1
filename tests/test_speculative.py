"""Speculative decoding on real runtimes (tiny GGUF and ONNX artifacts, random weights; issue 30): the verification
pass (k logits rows in one pass, then a rollback) against single decode steps; greedy output token-identical with and
without fast-forward, prompt lookup and a draft model (mixed backends), with a schema, a forced tool call, a thinking
budget and across a chat's KV reuse; the speculative sampling rule's distribution (chi-square)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qwen_edge.backends import load
from qwen_edge.runtime import constrain
from qwen_edge.runtime.chat import ChatSession
from qwen_edge.runtime.generate import generate
from qwen_edge.runtime.sampling import Sampling, candidate_probs
from qwen_edge.runtime.speculative import Speculative, lookup_draft

BACKENDS = [("tiny-qwen2", "gguf", "q8_0"), ("tiny-qwen3", "onnx", "int4")]
# the draft of each target: the same checkpoint in the other backend (mixed), another seed
DRAFTS = {"gguf": [("tiny-qwen2", "onnx", "int4", 0), ("tiny-qwen2", "gguf", "q8_0", 1)],
          "onnx": [("tiny-qwen3", "gguf", "q8_0", 0), ("tiny-qwen3", "onnx", "int4", 1)]}
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "kind": {"enum": ["cat", "dog", "bird"]},
    "size": {"enum": ["small", "large"]}, "indoor": {"type": "boolean"}},
    "required": ["name", "kind", "size", "indoor"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}}]


@pytest.fixture(scope="module", params=BACKENDS, ids=lambda b: b[1])
def session(request, exported):
    s = ChatSession.load(exported(*request.param), max_context=1024, max_new_tokens=48)
    s.backend = request.param[1]
    yield s
    s.close()


def copy_prompt(tok) -> list[int]:
    text = "def area(r):\n    return 3.14159 * r * r\n\nRewrite it:\n\ndef area(r):\n    return 3.14159 * r"
    return tok.encode_chat([{"role": "user", "content": text}], enable_thinking=False)


def counted(rt):
    """Count the runtime's model passes (prefill calls of every kind)."""
    calls = {"n": 0}
    for name in ("prefill", "prefill_all_logits"):
        real = getattr(rt, name)

        def wrapped(ids, _real=real):
            calls["n"] += 1
            return _real(ids)
        setattr(rt, name, wrapped)
    return calls


def test_verify_pass_equals_single_steps_and_rolls_back(session):
    rt = session.runtime
    prompt = copy_prompt(session.tokenizer)
    drafts = [int(t) for t in np.random.default_rng(0).integers(0, 5000, 8)]
    rt.reset()
    rt.prefill(prompt)
    single = []
    for t in drafts:
        rt.decode(t)
        single.append(rt.logits())
    rt.rewind(len(prompt))
    rows = rt.prefill_all_logits(drafts)
    assert rows.shape == (8, np.shape(single)[1]) and rt.n_cached == len(prompt) + 8
    # one pass of 8 rows rounds as 8 single steps do (bit-identical on llama.cpp q8_0; onnxruntime's batched int4
    # kernel differs by ~1e-7) and picks the same argmax
    np.testing.assert_allclose(rows, np.stack(single), atol=1e-5, rtol=0)
    assert (rows.argmax(1) == np.stack(single).argmax(1)).all()
    rt.rewind(len(prompt) + 3)  # keep 3 drafts, roll back 5; the next step continues from the kept ones
    rt.decode(drafts[3])
    np.testing.assert_allclose(rt.logits(), single[3], atol=1e-5, rtol=0)


def test_lookup_draft_finds_the_latest_longest_match():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3, 3) == [7, 5, 1]
    assert lookup_draft([1, 2, 3, 9, 4, 3], 4, 3) == [9, 4, 3]  # 1-gram fallback
    assert lookup_draft([5, 6, 7], 4, 3) == []


def greedy_pair(session, spec: Speculative, **kw):
    tok, rt = session.tokenizer, session.runtime
    ids = kw.pop("ids", None) or copy_prompt(tok)
    plain = generate(rt, ids, tokenizer=tok, stop_ids=session.stop_ids, max_new_tokens=48, **kw)
    fast = generate(rt, ids, tokenizer=tok, stop_ids=session.stop_ids, max_new_tokens=48, speculative=spec, **kw)
    return plain, fast


def test_lookup_greedy_identical(session):
    # a frequency penalty keeps the random weights from repeating one token forever: some drafts fail
    plain, fast = greedy_pair(session, Speculative(lookup=4), sampling=Sampling(frequency_penalty=0.2))
    assert fast.output_ids == plain.output_ids and fast.text == plain.text
    assert fast.finish_reason == plain.finish_reason
    s = fast.stats.speculative
    assert 0 < s["accepted"] < s["proposed"], (s, plain.output_ids)  # both accepted and rejected drafts happened


def test_draft_model_greedy_identical(session, exported):
    accepted = []
    for arch, fmt, quant, seed in DRAFTS[session.backend]:
        draft = load(exported(arch, fmt, quant, seed=seed), max_context=1024)
        try:
            plain, fast = greedy_pair(session, Speculative(draft=draft, draft_tokens=4),
                                      sampling=Sampling(frequency_penalty=0.2))
        finally:
            draft.close()
        assert fast.output_ids == plain.output_ids and fast.finish_reason == plain.finish_reason
        accepted.append(fast.stats.speculative["accepted"] / fast.stats.speculative["proposed"])
    # the drafts know no penalty: the target takes some and refuses others
    assert all(0 < a < 1 for a in accepted), accepted


def test_draft_cache_follows_the_context(exported):
    """The draft's KV cache is rewound to the shared prefix of each new context: its drafts are those of a fresh
    draft runtime given the whole context (greedy)."""
    art = exported("tiny-qwen2", "gguf", "q8_0", seed=1)
    kept, fresh = load(art, max_context=256), load(art, max_context=256)
    try:
        rng = np.random.default_rng(4)
        ctx1 = rng.integers(0, 5000, 20).tolist()
        ctx2 = ctx1[:12] + rng.integers(0, 5000, 6).tolist()
        p = Speculative(draft=kept, draft_tokens=4).proposer(Sampling(), kept.info.vocab_size)
        p.propose(ctx1, 4)
        got = [p.propose(ctx2, 4), p.propose(ctx2 + [7], 4)]
        want = [Speculative(draft=fresh).proposer(Sampling(), fresh.info.vocab_size).propose(c, 4)
                for c in (ctx2, ctx2 + [7])]
        assert got == want and len(got[0]) == 4
        # the kept cache holds exactly the context and the drafts it decoded, as the fresh one does
        assert kept.n_cached == fresh.n_cached == len(ctx2) + 1 + 3
        np.testing.assert_allclose(kept.logits(), fresh.logits(), atol=1e-5, rtol=0)
    finally:
        kept.close()
        fresh.close()


def test_fast_forward_identical_with_fewer_passes(session):
    tok, rt = session.tokenizer, session.runtime
    ids = tok.encode_chat([{"role": "user", "content": "A pet?"}], enable_thinking=False)
    outs, passes = [], []
    for ff in (False, True):
        calls = counted(rt)
        try:
            r = generate(rt, ids, tokenizer=tok, stop_ids=session.stop_ids, max_new_tokens=80,
                         constraint=constrain.json_schema(SCHEMA), speculative=Speculative(fast_forward=ff))
        finally:
            del rt.prefill, rt.prefill_all_logits  # back to the class's methods
        outs.append(r)
        passes.append(calls["n"])
    assert outs[0].finish_reason == "stop" and outs[1].output_ids == outs[0].output_ids
    assert passes[1] < passes[0] - 5, passes  # the forced keys went in batches


def test_tools_thinking_and_chat_reuse_identical(thinking_artifact):
    art = thinking_artifact("gguf")
    draft = load(thinking_artifact("onnx"), max_context=1024)  # the same weights on the other backend
    replies = []
    # plain; fast-forward + lookup; fast-forward + a draft model whose cache is kept across the turns
    for spec in (Speculative(fast_forward=False), Speculative(lookup=4), Speculative(draft=draft)):
        s = ChatSession.load(art, max_context=1024, max_new_tokens=60, thinking=True, thinking_budget=6)
        s.speculative = spec
        try:
            got = [s.send("What is the weather in Paris?", tools=TOOLS, tool_choice="required")]
            got.append(s.send("And the weather in Paris tomorrow? Paris, Paris."))
            assert got[1].stats.reused_tokens > 0  # the second turn reused the cached prefix
            replies.append([(r.output_ids, r.finish_reason) for r in got])
            if spec.draft is not None:  # the same weights: its drafts are mostly taken, in the second turn too
                st = got[1].stats.speculative
                assert st["accepted"] > 0.5 * st["proposed"], st
        finally:
            s.close()
    draft.close()
    assert replies[1] == replies[0] and replies[2] == replies[0]
    assert replies[0][0][1] == "tool_calls"


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (Wilson-Hilferty; scipy is not a dependency)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    return float(((obs - exp) ** 2 / exp).sum()), int(obs.size - 1)


@pytest.mark.parametrize("draft_q", [False, True], ids=["lookup-onehot", "draft-q"])
def test_speculative_sampling_rule_keeps_the_distribution(draft_q):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=64).astype(np.float32) * 2
    s = Sampling(temperature=0.8, top_k=20, top_p=0.95, seed=11)
    ids, p = candidate_probs(logits, s)
    target = np.zeros(64)
    target[ids] = p
    q = np.full(64, 1 / 64) if draft_q else None
    sampler, n = s.sampler(), 20000
    counts = np.zeros(64)
    for i in range(n):
        d = int(rng.integers(64)) if draft_q else int(ids[1])  # q uniform; or a fixed (one-hot) draft
        counts[sampler(logits, draft=d, q=q)] += 1
    stat, df = chi2(counts, target * n)
    assert stat < chi2_critical(df), (stat, df)
    assert counts[target == 0].sum() == 0  # nothing outside top-k/top-p


def test_sampled_lookup_follows_the_target_distribution(exported):
    """Many seeded 2-token continuations of a tiny model, plain vs prompt lookup: the same joint distribution."""
    from qwen_edge.text.tokenizer import Tokenizer

    rt = load(exported("tiny-qwen2", "gguf", "q8_0"), max_context=256)
    tok = Tokenizer.for_family("qwen2_5")
    ids = tok.encode("a b a b a b a b a")
    rt.prefill(ids)
    top = np.argsort(-rt.logits())[:2]
    ids = ids + [int(top[0]), int(top[1]), int(top[0])]  # the reply so far makes lookup propose the top tokens
    runs = 300
    tallies = []
    for spec in (None, Speculative(lookup=2, ngram=1)):
        seen: dict[tuple[int, ...], int] = {}
        for seed in range(runs):
            r = generate(rt, ids, sampling=Sampling(temperature=1.0, top_k=3, seed=seed), max_new_tokens=2,
                         cached_prefix=len(ids) - 1, speculative=spec)
            seen[tuple(r.output_ids)] = seen.get(tuple(r.output_ids), 0) + 1
        tallies.append(seen)
    rt.close()
    keys = sorted(set(tallies[0]) | set(tallies[1]))
    table = np.array([[t.get(k, 0) for k in keys] for t in tallies], dtype=float)
    expected = table.sum(0, keepdims=True) * table.sum(1, keepdims=True) / table.sum()
    keep = expected.min(0) >= 5
    stat = float(((table[:, keep] - expected[:, keep]) ** 2 / expected[:, keep]).sum())
    assert keep.sum() >= 3 and stat < chi2_critical(int(keep.sum()) - 1), (stat, keys, table)


def test_cli_lookup_and_draft_same_output_bad_flags_exit_2(cli, exported):
    import json

    art, other = exported("tiny-qwen2", "gguf", "q8_0"), exported("tiny-qwen2", "onnx", "int4")
    args = ["generate", str(art), "--prompt", "say it twice: one two three, one two", "--max-new-tokens", "12",
            "--frequency-penalty", "0.2", "--json"]
    docs = []
    for extra in ([], ["--lookup", "4"], ["--draft", str(other), "--draft-tokens", "3"]):
        r = cli(*args, *extra)
        assert r.returncode == 0, r.stderr
        docs.append(json.loads(r.stdout))
    assert docs[1]["output_ids"] == docs[0]["output_ids"] == docs[2]["output_ids"]
    assert docs[0]["stats"]["speculative"] is None and docs[2]["stats"]["speculative"]["proposed"] > 0
    r = cli(*args, "--draft", str(other), "--lookup", "2")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr


def test_serve_with_lookup_answers_as_plain_decoding(thinking_artifact, tmp_path):
    from server_proc import Server

    art = thinking_artifact("gguf")
    s = Server(art, tmp_path / "server.log", "--lookup", "4", "--queue", "0", "--max-context", "1024")
    try:
        assert "prompt lookup 4)" in s.log()
        c = s.client(key=None)
        got = c.completions.create(model="m", prompt="The lighthouse on the cape, the lighthouse on the", max_tokens=16,
                                   temperature=0, frequency_penalty=0.2).choices[0].text
        msgs = [{"role": "user", "content": "Repeat: red green blue, red green blue."}]
        chat = c.chat.completions.create(model="m", messages=msgs, max_tokens=16, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    finally:
        s.stop()
    with ChatSession.load(art, max_context=1024) as plain:
        want = generate(plain.runtime, plain.tokenizer.encode("The lighthouse on the cape, the lighthouse on the"),
                        tokenizer=plain.tokenizer, stop_ids=plain.stop_ids, max_new_tokens=16,
                        sampling=Sampling(frequency_penalty=0.2))
        ref = plain.complete(msgs, thinking=False, max_new_tokens=16, sampling=Sampling())
    assert got == want.text and chat.choices[0].message.content == ref.text
