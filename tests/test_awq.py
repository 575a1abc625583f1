"""Activation-aware scaling before quantization (issue 31, export/awq.py): the folded float model is the original
(transformers is the oracle), the search protects activation-outlier channels under the real quantizers (ggml's
and the ONNX exporter's), exports keep their layout and only change values, and what awq cannot apply to is a
one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from artifact_bytes import gguf_tensors, prompt_logits
from conftest import requires_torch

from qwen_edge.errors import QwenEdgeError

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

ARCH = "tiny-qwen3-256"
SHORT_TEXT = ("The river runs past the old mill, where the miller weighs the grain each morning. "
              "Der Fluss fliesst an der alten Muehle vorbei. Le meunier pese le grain chaque matin. ") * 6


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("awq") / "calib.txt"
    p.write_text(SHORT_TEXT, encoding="utf-8")
    return p


def _scaled_copy(src: Path, dst: Path, text: Path, alphas: tuple[float, ...], monkeypatch) -> dict:
    """`src` with awq's scales (searched over `alphas`) folded in, written as a float32 HF checkpoint."""
    import shutil

    from qwen_edge.export import awq
    from qwen_edge.model.checkpoint import Checkpoint
    from qwen_edge.model.safetensors_io import write_safetensors

    monkeypatch.setattr(awq, "ALPHAS", alphas)
    ck = Checkpoint(src)
    try:
        cols, rows, record = awq.awq_scales(ck, awq.onnx_quantizer(4, 16), None, str(text))
        sc = awq.ScaledCheckpoint(ck, cols, rows)
        shutil.copytree(src, dst)
        (dst / "model.safetensors").unlink()
        tensors = [(n, "F32", tuple(ck.tensor_info(n).shape), np.ascontiguousarray(sc.tensor(n)))
                   for n in sorted(ck.tensor_names())]
        write_safetensors(dst / "model.safetensors", tensors)
    finally:
        ck.close()
    return {"cols": cols, "rows": rows, "record": record}


@requires_torch
@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-qwen3"])
def test_the_folded_float_model_is_the_original(synth_ckpt, arch, calib_text, tmp_path, monkeypatch):
    """Scales forced on (alpha 0.5 everywhere): every block linear's columns and every fold target change, and
    transformers' logits of the scaled checkpoint equal the original's (q/k/v bias of qwen2, q/k norms of qwen3,
    GQA: 4 query heads on 2 KV heads)."""
    import torch
    from transformers import AutoModelForCausalLM

    src = synth_ckpt(arch)
    done = _scaled_copy(src, tmp_path / "scaled", calib_text, (0.5,), monkeypatch)
    per_layer = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"}
    assert {n.split(".", 3)[3].rsplit(".", 1)[0] for n in done["cols"]} == per_layer
    folds = {n.split(".", 3)[3] for n in done["rows"]}
    assert {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.v_proj.weight",
            "mlp.up_proj.weight"} <= folds
    if arch == "tiny-qwen2":
        assert "self_attn.v_proj.bias" in folds
    assert all(float(np.abs(s - 1).max()) > 0.05 for s in done["cols"].values())  # not a no-op
    ids = [9707, 11, 1879, 0, 576, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13]
    logits = []
    for path in (src, tmp_path / "scaled"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            logits.append(model(torch.tensor([ids])).logits[0].numpy())
    ref, got = logits
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("kind", ["ggml-q4_k", "ggml-q4_0", "onnx-int4"])
def test_the_search_protects_outlier_channels(kind):
    """A linear whose input has 4 channels 40x the rest (as real Qwen2.5 activations have): the searched scales cut
    the quantized output error well below round-to-nearest's (alpha 0, which the grid includes)."""
    from qwen_edge.export import awq

    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 512)).astype(np.float32) * 0.02
    x = rng.standard_normal((512, 512)).astype(np.float32)
    x[:, [7, 100, 301, 480]] *= 40.0
    quantize = {"ggml-q4_k": lambda: awq.ggml_quantizer(gguf.GGMLQuantizationType.Q4_K),
                "ggml-q4_0": lambda: awq.ggml_quantizer(gguf.GGMLQuantizationType.Q4_0),
                "onnx-int4": lambda: awq.onnx_quantizer(4, 32)}[kind]()
    alpha, s, errs = awq.search_group([w], x, np.abs(x).mean(axis=0), quantize)
    y = x @ w.T  # alpha 0 is the unscaled weights; each token's error counts relative to its output's norm
    assert errs[0] == pytest.approx(float((((y - x @ quantize(w, None).T) ** 2).sum(1) / (y ** 2).sum(1)).sum()),
                                    rel=1e-5)
    assert alpha > 0 and min(errs) < 0.6 * errs[0], (alpha, min(errs) / errs[0])
    assert s[[7, 100, 301, 480]].min() > 2 * np.median(s)


def test_awq_exports_keep_the_layout_and_change_only_values(exported, synth_ckpt, calib_text, tmp_path,
                                                            monkeypatch):
    """GGUF q4_k_m: the same tensors, types and shapes as the plain export; the block linears and the norms the
    scales fold into change, the tied embedding does not; it loads in llama.cpp and stays near the plain export.
    ONNX int4: model.onnx byte-identical (same graph, no speed cost), the weights file differs."""
    from qwen_edge.export import awq, export

    monkeypatch.setattr(awq, "ALPHAS", (0.0, 0.25, 0.5))
    opts = {"awq": True, "calibration_text": str(calib_text)}
    src = synth_ckpt(ARCH)
    plain = exported(ARCH, "gguf", "q4_k_m")
    art = export(src, "gguf", "q4_k_m", tmp_path, name="awq-gguf", options=opts)
    a, b = gguf_tensors(plain / "model.gguf"), gguf_tensors(art / "model.gguf")
    assert {n: v[:2] for n, v in a.items()} == {n: v[:2] for n, v in b.items()}
    changed = {n for n in a if a[n][2] != b[n][2]}
    assert "token_embd.weight" not in changed and "output_norm.weight" not in changed
    rec = json.loads((art / "manifest.json").read_text())["quantization"]["awq"]
    scaled_layers = {k.split(".")[0] for k, v in rec["alphas"].items() if v > 0}
    assert scaled_layers and all(f"blk.{i}.attn_norm.weight" in changed or rec["alphas"][f"{i}.qkv_proj"] == 0
                                 for i in map(int, scaled_layers))
    assert any(n.endswith("ffn_down.weight") for n in changed)
    outs = [prompt_logits(plain), prompt_logits(art)]
    assert np.isfinite(outs[1]).all() and np.corrcoef(outs[0], outs[1])[0, 1] > 0.9

    onnx_plain = exported(ARCH, "onnx", "int4")
    onnx_awq = export(src, "onnx", "int4", tmp_path, name="awq-onnx", options=opts)
    assert (onnx_plain / "model.onnx").read_bytes() == (onnx_awq / "model.onnx").read_bytes()
    assert (onnx_plain / "model.onnx_data").read_bytes() != (onnx_awq / "model.onnx_data").read_bytes()
    assert json.loads((onnx_awq / "manifest.json").read_text())["quantization"]["awq"]["alphas"]


def test_with_an_imatrix_the_matrix_is_the_scaled_models(synth_ckpt, calib_text, monkeypatch):
    """--imatrix with --awq: the matrix handed to the quantizer is the one of the scaled model's inputs (rescaled by
    1/s^2 from the original's; checked against a forward of the scaled checkpoint itself)."""
    from qwen_edge.export import awq
    from qwen_edge.export.imatrix import calibration_text, calibration_windows, collect
    from qwen_edge.model.checkpoint import Checkpoint
    from qwen_edge.text.tokenizer import Tokenizer

    monkeypatch.setattr(awq, "ALPHAS", (0.5,))
    src = synth_ckpt(ARCH)
    ck = Checkpoint(src)
    try:
        opts = {"awq": True, "imatrix": "auto", "calibration_text": str(calib_text)}
        scaled, values, _, rec = awq.calibrated(ck, "gguf", "q4_k_m", opts, ("f16",),
                                                lambda: awq.ggml_quantizer(gguf.GGMLQuantizationType.Q4_K))
        assert rec is not None and isinstance(scaled, awq.ScaledCheckpoint)
        text, _ = calibration_text(str(calib_text))
        direct = collect(scaled, calibration_windows(Tokenizer.from_dir(src), text)).values()
    finally:
        ck.close()
    assert set(direct) == set(values)
    for name, v in direct.items():
        np.testing.assert_allclose(values[name], v, rtol=2e-3, atol=1e-9 * float(v.max()), err_msg=name)


def test_awq_refuses_what_it_cannot_scale(synth_ckpt, cli, tmp_path):
    from qwen_edge.export import export

    src = synth_ckpt(ARCH)
    with pytest.raises(QwenEdgeError, match="symmetric blocks"):
        export(src, "onnx", "int4", tmp_path, options={"awq": True, "symmetric": False})
    with pytest.raises(QwenEdgeError, match="option awq: expected true or false"):
        export(src, "gguf", "q4_k_m", tmp_path, options={"awq": "yes"})
    r = cli("export", str(src), "--format", "gguf", "--quant", "f16", "--awq", "-o", str(tmp_path), "--no-verify")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: gguf f16 has nothing for awq to protect")
