"""The torch reference backend: load(), KV-cache prefill/rewind against full recompute, errors, Ctrl-C safety."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import requires_torch

import qwen_edge
from qwen_edge.errors import QwenEdgeError

pytestmark = requires_torch


@pytest.fixture(scope="module")
def rt(synth_ckpt):
    r = qwen_edge.load(synth_ckpt("tiny-qwen3"), max_context=128, threads=1)
    yield r
    r.close()


def test_load_checkpoint_gives_torch_runtime(rt, synth_ckpt):
    i = rt.info
    assert (i.backend, i.format, i.quant, i.device, i.threads) == ("torch", "hf", "fp32", "cpu", 1)
    assert i.context_length == 128 and i.vocab_size == 151936
    assert i.extra["stop_ids"] == [151645, 151643]
    assert rt.n_cached == 0


def test_runtime_contract_context_and_stop_ids(rt, synth_ckpt):
    """The contract every backend shares (tests/runtime_contract.py): the checkpoint's own maximum and stop ids in
    RuntimeInfo, and a max_context beyond max_position_embeddings is an error, not a silent clamp."""
    import json

    from runtime_contract import assert_info_describes_artifact, assert_max_context_bounded

    ckpt = synth_ckpt("tiny-qwen3")
    ctx = json.loads((ckpt / "config.json").read_text())["max_position_embeddings"]
    assert_info_describes_artifact(rt, ctx, [151645, 151643])
    assert_max_context_bounded(qwen_edge.load, ckpt, ctx, threads=1)


def test_cached_prefill_matches_full_recompute(rt):
    ids = [9707, 11, 1879, 0, 358, 1079, 264, 1273, 315, 279]
    rt.reset()
    all_logits = rt.prefill_all_logits(ids)
    assert all_logits.shape == (len(ids), 151936) and all_logits.dtype == np.float32
    assert rt.n_cached == len(ids)
    rt.reset()
    for k, t in enumerate(ids):
        rt.decode(t)
        np.testing.assert_allclose(rt.logits(), all_logits[k], atol=1e-4)
    rt.rewind(4)
    assert rt.n_cached == 4
    rt.prefill(ids[4:])
    np.testing.assert_allclose(rt.logits(), all_logits[-1], atol=1e-4)


def test_matches_transformers_without_cache(rt, synth_ckpt):
    import torch
    from transformers import AutoModelForCausalLM

    ids = [151644, 872, 198, 9707, 151645, 198]
    model = AutoModelForCausalLM.from_pretrained(str(synth_ckpt("tiny-qwen3")), dtype=torch.float32)
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    rt.reset()
    got = rt.prefill_all_logits(ids)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_context_and_rewind_errors(rt):
    rt.reset()
    rt.prefill(list(range(100, 200)))
    with pytest.raises(QwenEdgeError, match="context full"):
        rt.prefill(list(range(29)))
    assert rt.n_cached == 100
    with pytest.raises(QwenEdgeError):
        rt.rewind(101)
    with pytest.raises(QwenEdgeError, match="outside the vocabulary"):
        rt.prefill([151936])
    rt.reset()
    with pytest.raises(QwenEdgeError, match="no logits"):
        rt.logits()


def test_keyboard_interrupt_mid_forward_leaves_cache_consistent(rt):
    ids = [9707, 11, 1879, 0, 358, 1079]
    rt.reset()
    expected = rt.prefill_all_logits(ids + [264, 1273])[-1]
    rt.reset()
    rt.prefill(ids)
    layer = rt._model.model.layers[1]

    def boom(module, args, kwargs):
        raise KeyboardInterrupt

    handle = layer.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            rt.prefill([264, 1273])  # layer 0 already appended its keys when layer 1 is interrupted
    finally:
        handle.remove()
    assert rt.n_cached == len(ids)
    rt.prefill([264, 1273])
    np.testing.assert_allclose(rt.logits(), expected, atol=1e-4)


def test_bad_inputs(tmp_path, synth_ckpt):
    with pytest.raises(QwenEdgeError, match="no such artifact"):
        qwen_edge.load(tmp_path / "missing")
    with pytest.raises(QwenEdgeError, match="unknown option"):
        qwen_edge.load(synth_ckpt("tiny-qwen3"), bogus=1)
    with pytest.raises(QwenEdgeError, match="attn_implementation"):
        qwen_edge.load(synth_ckpt("tiny-qwen3"), attn_implementation="flash")


def test_eager_attention_agrees_with_sdpa(rt, synth_ckpt):
    ids = [9707, 11, 1879, 0, 358]
    rt.reset()
    a = rt.prefill_all_logits(ids)
    with qwen_edge.load(synth_ckpt("tiny-qwen3"), max_context=64, attn_implementation="eager") as eager:
        b = eager.prefill_all_logits(ids)
    np.testing.assert_allclose(a, b, atol=1e-4)
