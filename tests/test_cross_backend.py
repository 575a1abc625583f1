"""One conversation, three engines: GGUF (llama.cpp) and ONNX (onnxruntime) artifacts against the torch reference.

Each artifact's own tokenizer.json and chat template must give the reference's prompt ids turn after turn, and
greedy decoding must agree with the reference token for token on fp32 artifacts. An f16 GGUF rounds every weight,
so on a random model (nearly flat logits, small top-1 margins) greedy paths may part after a few tokens: for it the
test asks for identical prompt ids, logits within a tolerance and the first tokens in agreement.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import hostile
import pytest
from conftest import requires_torch

import qwen_edge
from qwen_edge.runtime.chat import ChatSession
from qwen_edge.runtime.sampling import Sampling
from qwen_edge.text.tokenizer import Tokenizer

pytestmark = requires_torch

ARCH = "tiny-qwen3"
CTX = 512
SYSTEM = "You are a helpful assistant."
TURNS = [("Hello! Who are you?", None), ("Tell me about the sea, briefly.", False),
         ("สวัสดีครับ และ 你好 — one more question?", None)]
"""(user message, thinking for the turn): the Qwen3 template renders the two modes differently."""
MAX_NEW = 12
SAMPLING = Sampling(repetition_penalty=50.0)
"""Greedy. A random model has one dominant token; the strong penalty (applied in the project, the same on every
backend) forbids repeats, so each step reads deeper into the logit ranking and the paths become discriminating."""
EXACT = [("gguf", "f32"), ("onnx", "fp32")]
ALL = EXACT + [("gguf", "f16")]
BACKEND_MODULES = {"gguf": ("qwen_edge.backends.llama_cpp", "llama_cpp"),
                   "onnx": ("qwen_edge.backends.onnxruntime", "onnxruntime")}


def _needs(fmt: str) -> None:
    """Skip only when the optional engine is not installed; a qwen_edge backend that fails to import fails."""
    module, native = BACKEND_MODULES[fmt]
    if importlib.util.find_spec(native) is None:
        pytest.skip(f"{native} (optional) is not installed")
    hostile.require_module(module)


def _conversation(path) -> list[tuple[list[int], list[int], int, list[dict[str, str]]]]:
    """(prompt ids, output ids, reused tokens, messages the prompt renders) per turn of the scripted chat, with
    the artifact's own tokenizer: the messages are this backend's own history (its replies) plus the turn's."""
    tok = Tokenizer.from_dir(path if path.is_dir() else path.parent)
    with qwen_edge.load(path, max_context=CTX, threads=2) as rt:
        s = ChatSession(rt, tok, system=SYSTEM, sampling=SAMPLING, max_new_tokens=MAX_NEW)
        out = []
        for text, think in TURNS:
            messages = s.messages + [{"role": "user", "content": text}]
            r = s.send(text, thinking=think)
            out.append((r.prompt_ids, r.output_ids, r.reused_tokens, messages))
        return out


@pytest.fixture(scope="module")
def reference(synth_ckpt):
    return _conversation(synth_ckpt(ARCH))


@pytest.fixture(scope="module")
def reference_logits(synth_ckpt, reference):
    with qwen_edge.load(synth_ckpt(ARCH), max_context=CTX) as rt:
        return rt.prefill_all_logits(reference[0][0])


@pytest.mark.parametrize("fmt,quant", EXACT)
def test_fp32_artifacts_match_reference_token_for_token(exported, reference, fmt, quant):
    _needs(fmt)
    got = _conversation(exported(ARCH, fmt, quant))
    for turn, ((p_ref, o_ref, _, _), (p, o, reused, _)) in enumerate(zip(reference, got)):
        assert p == p_ref, f"turn {turn}: prompt ids differ"
        assert o == o_ref, f"turn {turn}: greedy output differs"
        if turn:
            assert reused > 0  # every backend reuses its KV cache across turns


@pytest.mark.parametrize("fmt,quant", ALL)
def test_logits_close_to_reference(exported, synth_ckpt, reference, reference_logits, fmt, quant):
    _needs(fmt)
    prompt = reference[0][0]
    art = exported(ARCH, fmt, quant)
    assert Tokenizer.from_dir(art).encode_chat([{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": TURNS[0][0]}]) == prompt
    with qwen_edge.load(art, max_context=CTX, threads=2) as rt:
        logits = rt.prefill_all_logits(prompt)
    scale = float(np.abs(reference_logits).max())
    err = float(np.abs(logits - reference_logits).max())
    tol = 1e-3 if quant in ("f32", "fp32") else 2e-2
    assert err <= tol * max(scale, 1.0), f"max |logit diff| {err:.2e} (logit scale {scale:.2f})"
    assert (logits.argmax(-1) == reference_logits.argmax(-1)).mean() >= (1.0 if tol < 1e-2 else 0.9)


def test_f16_gguf_prompts_identical_and_first_tokens_agree(exported, synth_ckpt, reference):
    """Every turn's prompt is the reference tokenizer's rendering of the f16 backend's own history.

    While the replies agree that history is the reference's, so the prompt ids equal the reference's; once the
    f16 replies part from the reference, the next prompts still must be exactly what the reference tokenizer
    and template make of the conversation the f16 backend really had (no turn is left unchecked).
    """
    _needs("gguf")
    got = _conversation(exported(ARCH, "gguf", "f16"))
    assert got[0][0] == reference[0][0]
    assert got[0][1][:4] == reference[0][1][:4]
    ref_tok = Tokenizer.from_dir(synth_ckpt(ARCH))
    for turn, (prompt, _, _, messages) in enumerate(got):
        assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * turn + ["user"]
        expected = ref_tok.encode_chat(messages, add_generation_prompt=True, enable_thinking=TURNS[turn][1])
        assert prompt == expected, f"turn {turn}: prompt ids are not the reference rendering of its own history"
        if all(got[k][1] == reference[k][1] for k in range(turn)):  # same history: the reference's very prompt
            assert prompt == reference[turn][0], f"turn {turn}: prompt ids differ from the reference's"
