"""Families: every tensor spec agrees with gguf-py's own tables, and a family lives in one module (a made-up variant
registered from this test exports to GGUF and ONNX and runs on both backends)."""

from __future__ import annotations

import gguf
import pytest
from gguf.constants import MODEL_TENSORS

from qwen_edge.families import FAMILIES, MODELS, Arch, ModelSpec, family_of, register, unregister
from qwen_edge.families.qwen3 import GEN_Q3, Qwen3
from qwen_edge.families.qwen2 import ADDED_TOKENS as QWEN2_TOKENS


@pytest.mark.parametrize("spec_name", sorted(MODELS))
def test_tensor_specs_match_gguf_py(spec_name):
    arch = MODELS[spec_name].arch
    fam = family_of(arch)
    names = gguf.TensorNameMap(fam.gguf_arch, arch.num_layers)
    allowed = set(MODEL_TENSORS[fam.gguf_arch])
    for spec in fam.tensors:
        if spec.present(arch):
            assert spec.kind in allowed, f"{fam.gguf_arch_name} has no {spec.kind.name}"
    for t in fam.tensor_map(arch):
        assert names.get_name(t.hf, try_suffixes=(".weight", ".bias")) == t.gguf, t.hf


def test_registry_is_keyed_by_hf_architecture():
    for key, fam in FAMILIES.items():
        assert fam.hf_config(MODELS[fam.models[0].name].arch)["architectures"] == [key]


class EdgeQwen(Qwen3):
    """A made-up release: Qwen3's graph (llama.cpp runs it as qwen3) with its own config names, Qwen2's added
    tokens and ChatML template without thinking, an untied head and an 8K context."""

    hf_architecture = "EdgeQwenForCausalLM"
    model_type = "edge_qwen"
    added_tokens = QWEN2_TOKENS
    templates = ("qwen2_5",)
    default_max_position = 8192


EDGE = EdgeQwen()
EDGE.models = (ModelSpec("tiny-edge-qwen", EDGE.size3(64, 2, 4, 2, 32, 128, tied=False), "qwen2_5",
                         size_label="tiny", generation=GEN_Q3),)


@pytest.fixture
def edge_family():
    register(EDGE)
    yield EDGE
    unregister(EDGE.hf_architecture)


def test_made_up_family_exports_and_runs(edge_family, tmp_path):
    from qwen_edge import Sampling, load
    from qwen_edge.model.checkpoint import Checkpoint
    from qwen_edge.export import export
    from qwen_edge.runtime.generate import generate
    from qwen_edge.model.synth import synth
    from qwen_edge.text.tokenizer import Tokenizer

    src = synth("tiny-edge-qwen", tmp_path / "ckpt")
    ck = Checkpoint(src)
    assert ck.arch == MODELS["tiny-edge-qwen"].arch and ck.arch.family == "edge_qwen"
    assert Arch.from_hf_config(ck.config) == ck.arch
    assert "lm_head.weight" in ck.tensor_names() and "model.layers.1.self_attn.q_norm.weight" in ck.tensor_names()
    ck.close()
    outputs = {}
    for fmt, quant in (("gguf", "f16"), ("onnx", "fp32")):
        art = export(src, fmt, quant, tmp_path / "out")
        tok = Tokenizer.from_dir(art)
        assert "<think>" not in tok.apply_chat_template([{"role": "user", "content": "hi"}], True)
        rt = load(art)
        try:
            res = generate(rt, tok.encode("Hello"), max_new_tokens=4, sampling=Sampling(temperature=0.0))
        finally:
            rt.close()
        assert len(res.output_ids) == 4
        outputs[fmt] = res.output_ids
    assert (tmp_path / "out").is_dir()
