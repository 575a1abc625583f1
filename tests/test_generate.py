"""Sampling semantics, the decode loop (stop ids/strings, context, cancel, streaming) and the generate verb."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from conftest import requires_torch

from qwen_edge.backends.base import Runtime, RuntimeInfo
from qwen_edge.errors import QwenEdgeError
from qwen_edge.runtime.generate import _StopStringFilter, generate
from qwen_edge.runtime.sampling import Sampling, apply_repetition_penalty, candidate_probs

VOCAB = 151936


# --- sampling on crafted logits ----------------------------------------------------------------------------------
def _logits_from_probs(p: list[float], vocab: int = 16) -> np.ndarray:
    x = np.full(vocab, -1e9, dtype=np.float32)
    x[: len(p)] = np.log(np.asarray(p, dtype=np.float64))
    return x


def _draws(s: Sampling, logits: np.ndarray, n: int = 2000, context=()) -> np.ndarray:
    sampler = s.sampler()
    return np.array([sampler(logits, context) for _ in range(n)])


def test_greedy_is_argmax():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(VOCAB).astype(np.float32)
    assert Sampling().sampler()(x) == int(np.argmax(x))
    assert Sampling(temperature=0.7, top_k=1).sampler()(x) == int(np.argmax(x))


def test_seed_reproducible_and_seed_sensitive():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(VOCAB).astype(np.float32) * 3
    a = _draws(Sampling(temperature=1.0, seed=7), x, 50)
    b = _draws(Sampling(temperature=1.0, seed=7), x, 50)
    c = _draws(Sampling(temperature=1.0, seed=8), x, 50)
    assert (a == b).all()
    assert (a != c).any()


def test_top_k_only_draws_the_k_best():
    x = _logits_from_probs([0.4, 0.3, 0.2, 0.1])
    d = _draws(Sampling(temperature=1.0, top_k=2, seed=0), x)
    assert set(d.tolist()) == {0, 1}
    assert abs((d == 0).mean() - 0.4 / 0.7) < 0.05  # renormalized over the survivors


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = _logits_from_probs([0.5, 0.3, 0.15, 0.05])
    assert set(_draws(Sampling(temperature=1.0, top_p=0.8, seed=0), x).tolist()) == {0, 1}
    assert set(_draws(Sampling(temperature=1.0, top_p=0.81, seed=0), x).tolist()) == {0, 1, 2}
    assert set(_draws(Sampling(temperature=1.0, top_p=0.3, seed=0), x).tolist()) == {0}


def test_min_p_drops_tokens_below_fraction_of_best():
    x = _logits_from_probs([0.5, 0.3, 0.15, 0.05])
    # thresholds: 0.5 * 0.35 = 0.175 -> keeps 0.5, 0.3
    assert set(_draws(Sampling(temperature=1.0, min_p=0.35, seed=0), x).tolist()) == {0, 1}
    assert set(_draws(Sampling(temperature=1.0, min_p=0.09, seed=0), x).tolist()) == {0, 1, 2, 3}


def test_temperature_matches_softmax_frequencies():
    x = _logits_from_probs([0.5, 0.3, 0.2])
    d = _draws(Sampling(temperature=2.0, seed=3), x, 6000)
    q = np.exp(np.log([0.5, 0.3, 0.2]) / 2.0)
    q /= q.sum()
    freq = np.bincount(d, minlength=3)[:3] / len(d)
    assert np.abs(freq - q).max() < 0.03


def test_repetition_penalty_semantics():
    x = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    y = apply_repetition_penalty(x, [0, 1, 1], 2.0)
    assert y.tolist() == [1.0, -4.0, 1.0, 0.5]  # positive divided, negative multiplied, each id once
    # greedy flips away from a repeated token
    assert Sampling(repetition_penalty=2.5).sampler()(x, [0]) == 2
    assert Sampling().sampler()(x, [0]) == 0


def test_top_p_fast_path_is_exact_on_full_vocab():
    rng = np.random.default_rng(5)
    for scale, top_p in ((8.0, 0.9), (0.5, 0.95), (3.0, 0.5)):
        x = (rng.standard_normal(VOCAB) * scale).astype(np.float32)
        s = Sampling(temperature=0.8, top_p=top_p)
        ids, p = candidate_probs(x, s)
        z = x.astype(np.float64) / 0.8
        order = np.argsort(-z, kind="stable")
        q = np.exp(z[order] - z[order[0]])
        q /= q.sum()
        keep = int(np.count_nonzero(np.cumsum(q) - q < top_p))
        assert set(ids.tolist()) == set(order[:keep].tolist())
        assert abs(p.sum() - 1) < 1e-9


def test_presence_and_frequency_penalties_semantics():
    # OpenAI's: logit -= presence * (count > 0) + frequency * count, over the tokens this generation chose
    x = np.array([3.0, 2.5, 1.0, 0.0], dtype=np.float32)
    s = Sampling(presence_penalty=0.4, frequency_penalty=0.3).sampler()
    assert [s(x) for _ in range(4)] == [0, 1, 0, 0]  # 3-0.7=2.3 < 2.5; then 2.3 > 2.5-0.7; 3-0.4-0.6=2.0 > 1.8
    assert s.counts == {0: 3, 1: 1}
    # the prompt is not counted (unlike repetition_penalty), and 0 changes nothing
    assert Sampling(presence_penalty=2.0).sampler()(x, [0, 0, 0]) == 0
    assert [Sampling().sampler()(x) for _ in range(3)] == [0, 0, 0]
    # a negative penalty favours repeats
    s = Sampling(temperature=0.0, presence_penalty=-2.0).sampler()
    assert [s(np.array([1.0, 2.0], dtype=np.float32)) for _ in range(3)] == [1, 1, 1]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1),
                                    dict(top_k=-1), dict(repetition_penalty=0), dict(presence_penalty=2.5),
                                    dict(frequency_penalty=-3)])
def test_bad_sampling_values_raise(kwargs):
    with pytest.raises(QwenEdgeError):
        Sampling(**kwargs)


def test_from_generation_config():
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
    s = Sampling.from_generation_config(gen, top_p=0.5, top_k=None)
    assert (s.temperature, s.top_p, s.top_k) == (0.6, 0.5, 20)
    assert Sampling.from_generation_config({"do_sample": False, "temperature": 0.7}).greedy


# --- stop strings --------------------------------------------------------------------------------------------------
def test_stop_string_filter_holds_back_partial_matches():
    f = _StopStringFilter(["END", "\n\nUser:"])
    out = []
    for piece in ["Hello E", "N", "joy. \n", "\nUse", "r: more"]:
        text, hit = f.feed(piece)
        out.append(text)
        if hit:
            break
    assert out == ["Hello ", "", "ENjoy. ", "", ""]
    assert hit and "".join(out) == "Hello ENjoy. "


# --- the loop on a scripted runtime (exact control of the token stream) --------------------------------------------
class ScriptedRuntime(Runtime):
    """A Runtime whose next token follows a script (one-hot logits); the KV cache is the list of ids it holds."""

    def __init__(self, script: list[int], context_length: int = 64, interrupt_at: int | None = None):
        self.script = script
        self.cache: list[int] = []
        self.prompt_len: int | None = None
        self.interrupt_at = interrupt_at
        self.info = RuntimeInfo(backend="scripted", device="cpu", threads=1, artifact="", context_length=context_length,
                                vocab_size=VOCAB)

    @property
    def n_cached(self) -> int:  # type: ignore[override]
        return len(self.cache)

    def prefill(self, ids):
        self.check_room(len(ids))
        if self.interrupt_at is not None and len(self.cache) + len(ids) > self.interrupt_at:
            raise KeyboardInterrupt
        if self.prompt_len is None:
            self.prompt_len = len(self.cache) + len(ids)
        self.cache.extend(int(i) for i in ids)

    def logits(self):
        k = len(self.cache) - (self.prompt_len or 0)
        x = np.zeros(VOCAB, dtype=np.float32)
        x[self.script[k] if k < len(self.script) else 0] = 10.0
        return x

    def rewind(self, n):
        assert 0 <= n <= len(self.cache)
        del self.cache[n:]
        if n == 0:
            self.prompt_len = None


@pytest.fixture(scope="module")
def tok(synth_ckpt):
    from qwen_edge.text.tokenizer import Tokenizer

    return Tokenizer.from_dir(synth_ckpt("tiny-qwen3"))


def _split_inside_characters(tok, text: str) -> list[int]:
    """Token ids for `text` cut every 2 bytes, so 3-byte Thai/CJK characters always straddle two tokens."""
    from qwen_edge.text.tokenizer import load_qwen_ranks

    ranks = load_qwen_ranks()
    data = text.encode("utf-8")
    ids = []
    for i in range(0, len(data), 2):
        chunk = data[i:i + 2]
        if chunk in ranks:
            ids.append(ranks[chunk])
        else:
            ids.extend(ranks[bytes([b])] for b in chunk)
    assert b"".join(tok.token_bytes(i) for i in ids) == data
    return ids


@pytest.mark.parametrize("text", ["สวัสดีครับ ภาษาไทย", "你好，世界！今天天气很好。", "emoji 🙂 ok"])
def test_streaming_never_breaks_a_character(tok, text):
    ids = _split_inside_characters(tok, text)
    assert tok.decode(ids[:1]).endswith("\ufffd") or len(tok.token_bytes(ids[0])) < 3  # really split
    rt = ScriptedRuntime(ids + [151645])
    pieces: list[str] = []
    r = generate(rt, [1, 2, 3], max_new_tokens=100, stop_ids=[151645], tokenizer=tok, on_text=pieces.append)
    assert r.finish_reason == "stop" and r.stop_id == 151645
    assert r.output_ids == ids
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == r.text


def test_stop_string_across_tokens_never_leaks(tok):
    text = "Answer: 42 ###STOP### trailing"
    ids = tok.encode(text)
    rt = ScriptedRuntime(ids)
    pieces: list[str] = []
    r = generate(rt, [1, 2], max_new_tokens=50, stop_strings=["###STOP"], tokenizer=tok, on_text=pieces.append)
    assert r.finish_reason == "stop_string"
    assert r.text == "".join(pieces) == "Answer: 42 "
    # a partial match that does not complete is released at the end
    rt = ScriptedRuntime(tok.encode("tail ##"))
    pieces = []
    r = generate(rt, [1], max_new_tokens=len(tok.encode("tail ##")), stop_strings=["###"], tokenizer=tok,
                 on_text=pieces.append)
    assert r.finish_reason == "length" and "".join(pieces) == r.text == "tail ##"


def test_context_full_ends_with_context_and_too_long_prompt_errors(tok):
    rt = ScriptedRuntime([5] * 100, context_length=32)
    r = generate(rt, list(range(10, 30)), max_new_tokens=100, tokenizer=tok)
    assert r.finish_reason == "context"
    assert rt.n_cached == 32 and len(r.output_ids) == 32 - 20 + 1
    with pytest.raises(QwenEdgeError, match="context holds 32"):
        generate(ScriptedRuntime([5], context_length=32), list(range(33)), tokenizer=tok)


def test_cancel_event_and_keyboard_interrupt_keep_cache_consistent(tok):
    script = tok.encode(" one two three four five six seven eight")
    ev = threading.Event()
    seen: list[str] = []

    def on_text(p):
        seen.append(p)
        if len(seen) == 3:
            ev.set()

    rt = ScriptedRuntime(script)
    r = generate(rt, [1, 2, 3], max_new_tokens=50, tokenizer=tok, on_text=on_text, cancel=ev)
    assert r.finish_reason == "cancelled" and len(r.output_ids) == 3
    assert rt.cache == [1, 2, 3] + r.output_ids[:-1]

    def ctrl_c(p):
        raise KeyboardInterrupt

    rt = ScriptedRuntime(script)
    r = generate(rt, [1, 2, 3], max_new_tokens=50, tokenizer=tok, on_text=ctrl_c)
    assert r.finish_reason == "cancelled" and rt.cache == [1, 2, 3]

    rt = ScriptedRuntime(script, interrupt_at=6)  # Ctrl-C inside a decode step
    r = generate(rt, [1, 2, 3], max_new_tokens=50, tokenizer=tok)
    assert r.finish_reason == "cancelled"
    assert rt.cache == ([1, 2, 3] + r.output_ids)[: rt.n_cached] and rt.n_cached == 6


# --- the loop on the torch reference -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_rt(synth_ckpt):
    import qwen_edge

    rt = qwen_edge.load(synth_ckpt("tiny-qwen3"), max_context=256)
    yield rt
    rt.close()


def _naive_greedy(rt, prompt, n, penalty=1.0):
    """Greedy decoding recomputing the whole sequence every step (no KV-cache reuse)."""
    seq = list(prompt)
    s = Sampling(repetition_penalty=penalty).sampler()
    for _ in range(n):
        rt.reset()
        rt.prefill(seq)
        seq.append(s(rt.logits(), seq))
    return seq[len(prompt):]


@requires_torch
def test_generate_greedy_matches_no_cache_decoding(torch_rt, tok):
    prompt = tok.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}])
    r = generate(torch_rt, prompt, sampling=Sampling(repetition_penalty=1.3), max_new_tokens=12, tokenizer=tok)
    assert r.finish_reason == "length" and len(r.output_ids) == 12
    assert r.output_ids == _naive_greedy(torch_rt, prompt, 12, penalty=1.3)
    st = r.stats
    assert st.prefill_tokens == len(prompt) and st.new_tokens == 12
    assert st.time_to_first_token_s > 0 and st.prefill_tokens_per_s > 0 and st.decode_tokens_per_s > 0


@requires_torch
def test_generate_sampling_reproducible_on_torch(torch_rt, tok):
    prompt = tok.encode("The weather today is")
    runs = [generate(torch_rt, prompt, sampling=Sampling(temperature=1.0, top_p=0.95, seed=s), max_new_tokens=10,
                     tokenizer=tok).output_ids for s in (11, 11, 12)]
    assert runs[0] == runs[1] != runs[2]


@requires_torch
def test_generate_stop_id_and_prefix_reuse(torch_rt, tok):
    prompt = tok.encode("Once upon a time")
    full = generate(torch_rt, prompt, sampling=Sampling(repetition_penalty=1.5), max_new_tokens=8, tokenizer=tok)
    stop = full.output_ids[3]
    k = full.output_ids.index(stop)
    r = generate(torch_rt, prompt, sampling=Sampling(repetition_penalty=1.5), max_new_tokens=8, stop_ids=[stop],
                 tokenizer=tok)
    assert r.finish_reason == "stop" and r.output_ids == full.output_ids[:k]
    # a longer prompt that starts with the cached one only prefills its new tail
    longer = prompt + r.output_ids + tok.encode(" and then")
    cached = torch_rt.n_cached
    assert cached == len(prompt) + len(r.output_ids)  # the stop id itself is never prefilled
    r2 = generate(torch_rt, longer, max_new_tokens=4, tokenizer=tok, cached_prefix=cached)
    assert r2.stats.reused_tokens == cached and r2.stats.prefill_tokens == len(longer) - cached
    fresh = generate(torch_rt, longer, max_new_tokens=4, tokenizer=tok)
    assert fresh.stats.reused_tokens == 0 and fresh.output_ids == r2.output_ids


@requires_torch
def test_generate_context_on_torch(synth_ckpt, tok):
    import qwen_edge

    with qwen_edge.load(synth_ckpt("tiny-qwen3"), max_context=40) as rt:
        r = generate(rt, list(range(1000, 1030)), max_new_tokens=100, tokenizer=tok)
        assert r.finish_reason == "context" and rt.n_cached == 40
        with pytest.raises(QwenEdgeError, match="context"):
            generate(rt, list(range(1000, 1041)), tokenizer=tok)


# --- the generate verb ---------------------------------------------------------------------------------------------
@requires_torch
def test_generate_cli_json(cli, synth_ckpt, tok):
    ckpt = synth_ckpt("tiny-qwen3")
    p = cli("generate", str(ckpt), "--prompt", "Hello there", "--max-new-tokens", "5", "--json", "--no-think")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["prompt_ids"] == tok.encode_chat([{"role": "user", "content": "Hello there"}], enable_thinking=False)
    assert len(doc["output_ids"]) <= 5 and isinstance(doc["text"], str)
    for k in ("time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s", "new_tokens"):
        assert k in doc["stats"]
    assert doc["finish_reason"] in ("stop", "length") and doc["runtime"]["backend"] == "torch"
    # greedy by default: the same again
    p2 = cli("generate", str(ckpt), "--prompt", "Hello there", "--max-new-tokens", "5", "--json", "--no-think")
    assert json.loads(p2.stdout)["output_ids"] == doc["output_ids"]


@requires_torch
def test_generate_cli_stream_messages_and_errors(cli, synth_ckpt, tmp_path):
    ckpt = synth_ckpt("tiny-qwen3")
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]))
    p = cli("generate", str(ckpt), "--messages", str(msgs), "--max-new-tokens", "4", "--temperature", "0.8")
    assert p.returncode == 0, p.stderr
    assert "tok/s" in p.stderr and "TTFT" in p.stderr
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"role": "user", "content": "\xff\xfe"}]')
    p = cli("generate", str(ckpt), "--messages", str(bad))
    assert p.returncode == 2 and "not valid UTF-8" in p.stderr and "Traceback" not in p.stderr
    bad.write_text("[{role: user}]")
    p = cli("generate", str(ckpt), "--messages", str(bad))
    assert p.returncode == 2 and "not valid JSON" in p.stderr
    p = cli("generate", str(ckpt), "--prompt", "x " * 300, "--max-context", "64")
    assert p.returncode == 2 and "context holds 64" in p.stderr
