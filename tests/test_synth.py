"""Synthesized checkpoints: architecture-exact, deterministic, loadable by transformers."""

import hashlib
import json

import pytest

from conftest import requires_torch
from qwen_edge.model.checkpoint import Checkpoint, expected_tensors
from qwen_edge.families import MODELS, get_model
from qwen_edge.model.synth import synth


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    a = synth("tiny-qwen2", tmp_path / "a", seed=3)
    b = synth("tiny-qwen2", tmp_path / "b", seed=3)
    c = synth("tiny-qwen2", tmp_path / "c", seed=4)
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert _sha(a / f) == _sha(b / f), f
    assert _sha(a / "model.safetensors") != _sha(c / "model.safetensors")


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("tiny-")])
def test_tiny_variants_validate(synth_ckpt, name):
    ck = Checkpoint(synth_ckpt(name))
    assert ck.arch == get_model(name).arch
    assert ("lm_head.weight" in ck.tensor_names()) == (not ck.arch.tie_word_embeddings)
    assert all(ck.tensor_info(n).dtype == "BF16" for n in ck.tensor_names())


def test_real_tokenizer_and_generation_config(synth_ckpt):
    d = synth_ckpt("tiny-qwen3")
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    tok = json.loads((d / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == 151643
    assert any(t["content"] == "</think>" and t["id"] == 151668 for t in tok["added_tokens"])


@pytest.mark.slow
def test_qwen25_05b_matches_the_real_release(tmp_path):
    d = synth("qwen2.5-0.5b", tmp_path / "q05")
    ck = Checkpoint(d)
    n = sum(int(__import__("numpy").prod(ck.tensor_info(t).shape)) for t in ck.tensor_names())
    assert n == 494_032_768
    assert ck.config["tie_word_embeddings"] is True and "lm_head.weight" not in ck.tensor_names()


@requires_torch
@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen2-untied", "tiny-qwen3", "tiny-qwen3-untied"])
def test_transformers_loads_synthesized(synth_ckpt, name):
    import torch
    import transformers

    d = synth_ckpt(name)
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    arch = get_model(name).arch
    assert sum(p.numel() for p in m.parameters()) == arch.parameter_count()
    with torch.no_grad():
        out = m(torch.tensor([[151644, 872, 198]]))
    assert out.logits.shape == (1, 3, 151936)
    assert torch.isfinite(out.logits).all()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert tok("hello world").input_ids == [14990, 1879]


@requires_torch
@pytest.mark.slow
def test_transformers_loads_05b(tmp_path):
    import torch
    import transformers

    d = synth("qwen2.5-0.5b", tmp_path / "q05")
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    assert sum(p.numel() for p in m.parameters()) == 494_032_768
