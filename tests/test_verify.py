"""verify: the parity gate passes faithful artifacts of the fidelity checkpoint and fails a corrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_torch
from qwen_edge.errors import QwenEdgeError
from qwen_edge.verify import (LOWER_BOUNDS, METRICS, UPPER_BOUNDS, Accumulator, common_prefix, gate,
                              thresholds_for)

REPORT_KEYS = {"passed", "metrics", "thresholds", "failed", "artifact", "reference", "quant", "tokens_evaluated"}


@pytest.fixture(scope="session")
def fidelity_ckpt() -> Path:
    from fidelity import fidelity_checkpoint

    return fidelity_checkpoint()


@pytest.fixture(scope="session")
def fid_export(fidelity_ckpt, tmp_path_factory):
    from qwen_edge.export import export

    out = tmp_path_factory.mktemp("fidelity_artifacts")
    cache: dict[tuple[str, str], Path] = {}

    def make(fmt: str, quant: str) -> Path:
        if (fmt, quant) not in cache:
            cache[(fmt, quant)] = export(fidelity_ckpt, fmt, quant, out, name=f"fid-{fmt}-{quant}")
        return cache[(fmt, quant)]

    return make


# --- without torch: the metric arithmetic and the threshold tables ----------------------------------------------------
def test_metrics_of_identical_logits_are_exact():
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((20, 1000)) * 4).astype(np.float32)
    ids = list(rng.integers(0, 1000, 20))
    acc = Accumulator()
    acc.add(ids, ref, ref.copy())
    m = acc.metrics()
    assert m["max_abs_logit_error"] == 0 and m["kl_mean"] == 0 and m["top1_agreement"] == 1
    assert m["ppl_reference"] == pytest.approx(m["ppl_artifact"]) and m["ppl_rel_change"] == 0


def test_kl_matches_a_direct_float64_computation():
    rng = np.random.default_rng(1)
    ref = (rng.standard_normal((9, 500)) * 5).astype(np.float32)
    art = ref + rng.standard_normal(ref.shape).astype(np.float32)
    acc = Accumulator()
    acc.add(list(range(9)), ref, art)
    lp = ref.astype(np.float64) - np.log(np.exp(ref.astype(np.float64)).sum(-1, keepdims=True))
    lq = art.astype(np.float64) - np.log(np.exp(art.astype(np.float64)).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    m = acc.metrics()
    assert m["kl_mean"] == pytest.approx(kl.mean(), rel=1e-9)
    assert m["max_abs_logit_error"] == pytest.approx(np.abs(ref - art).max(), rel=1e-6)
    nll = -np.mean([lp[i, i + 1] for i in range(8)])
    assert m["ppl_reference"] == pytest.approx(np.exp(nll), rel=1e-9)


def test_nonfinite_artifact_logits_fail_instead_of_crashing():
    ref = np.zeros((3, 10), np.float32)
    art = ref.copy()
    art[1, 2] = np.nan
    acc = Accumulator()
    acc.add([1, 2, 3], ref, art)
    assert "max_abs_logit_error" in gate(acc.metrics(), thresholds_for("f16"))


def test_thresholds_tighten_with_bits_and_accept_overrides():
    fp32, q8, q4 = thresholds_for("fp32"), thresholds_for("q8_0"), thresholds_for("q4_k_m")
    for k in UPPER_BOUNDS:
        assert fp32[k] <= q8[k] <= q4[k]
    for k in LOWER_BOUNDS:
        assert fp32[k] >= q8[k] >= q4[k]
    assert thresholds_for("int8") == q8 and thresholds_for("iq4_nl") == q4
    assert thresholds_for("weird", bits_per_weight=8.5) == q8
    assert thresholds_for("q8_0", overrides={"kl_mean": 0.5})["kl_mean"] == 0.5
    with pytest.raises(QwenEdgeError, match="unknown verify threshold"):
        thresholds_for("q8_0", overrides={"kl": 1})
    with pytest.raises(QwenEdgeError, match="expected a number"):
        thresholds_for("q8_0", overrides={"kl_mean": "x"})


def test_gate_directions_and_nan():
    t = {"kl_mean": 0.1, "top1_agreement": 0.9}
    assert gate({"kl_mean": 0.05, "top1_agreement": 0.95}, t) == []
    assert gate({"kl_mean": 0.2, "top1_agreement": 0.8}, t) == ["kl_mean", "top1_agreement"]
    assert gate({"kl_mean": float("nan"), "top1_agreement": 1.0}, t) == ["kl_mean"]
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0
    assert set(METRICS) == set(UPPER_BOUNDS) | set(LOWER_BOUNDS)


def test_missing_reference_is_bad_input(exported, cli, tmp_path):
    art = exported("tiny-qwen3", "gguf", "q8_0")
    r = cli("verify", str(art), "--reference", str(tmp_path / "nope"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "reference checkpoint not found" in r.stderr


def test_without_torch_names_the_extra(exported, monkeypatch):
    import importlib.util

    from qwen_edge import verify  # the public function (qwen_edge.verify is also the module's name)

    art = exported("tiny-qwen3", "gguf", "q8_0")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a))
    with pytest.raises(QwenEdgeError, match=r"qwen-edge\[verify\]"):
        verify(art)


# --- with torch: the gate on real artifacts ------------------------------------------------------------------------
@requires_torch
@pytest.mark.parametrize("fmt,quant", [("onnx", "fp32"), ("gguf", "f16"), ("gguf", "q8_0"), ("onnx", "int8")])
def test_gate_passes_faithful_artifacts(fid_export, fidelity_ckpt, cli, fmt, quant):
    from qwen_edge.artifact import Artifact

    art = fid_export(fmt, quant)
    r = cli("verify", str(art), "--quick", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert REPORT_KEYS <= set(report)
    assert set(METRICS) | {"ppl_reference", "ppl_artifact"} <= set(report["metrics"])
    assert report["passed"] is True and report["failed"] == []
    assert report["quant"] == quant and report["reference"] == str(fidelity_ckpt)
    assert report["tokens_evaluated"] > 300 and report["reference_matches_source"] is True
    # the fidelity checkpoint is peaked on this text: that is what makes quantization error visible
    assert report["metrics"]["ppl_reference"] < 3.0
    stored = Artifact.open(art).manifest["parity"]  # hashes still check: the manifest is not among its files
    assert stored["passed"] is True and stored["metrics"] == report["metrics"]


@requires_torch
def test_exact_formats_agree_tightly(fid_export):
    from qwen_edge.verify import verify

    report = verify(fid_export("onnx", "fp32"), quick=True, store=False)
    m = report["metrics"]
    assert m["max_abs_logit_error"] < 1e-2 and m["top1_agreement"] == 1.0
    assert m["greedy_common_prefix_min"] == 32


def _zero_gguf_tensor(path: Path, name: str) -> None:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == name)
    offset, n = int(t.data_offset), int(t.n_bytes)
    del r
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * n)


@requires_torch
def test_gate_fails_a_silently_corrupted_weight(fid_export, cli, tmp_path):
    """Zero one tensor inside model.gguf and fix the manifest's hashes: the files check out, only verify can tell."""
    from qwen_edge.artifact import MANIFEST, Artifact, file_entry, write_json

    art = tmp_path / "broken"
    shutil.copytree(fid_export("gguf", "f16"), art)
    _zero_gguf_tensor(art / "model.gguf", "blk.0.ffn_down.weight")
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["files"] = [file_entry(art, f["path"]) for f in manifest["files"]]
    write_json(art / MANIFEST, manifest)
    Artifact.open(art)  # integrity checks pass

    r = cli("verify", str(art), "--quick")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("failed: ") and "f16" in r.stderr
    failed = Artifact.open(art).manifest["parity"]["failed"]
    assert failed and all(name in r.stderr for name in failed)
    assert "FAILED" in r.stdout

    r = cli("verify", str(art), "--quick", "--json")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["passed"] is False and report["failed"] == failed


@requires_torch
def test_gate_fails_an_artifact_exported_from_a_tampered_checkpoint(fidelity_ckpt, tmp_path, cli):
    """Swap two layers' attention projections in a copy of the checkpoint, export it, verify against the original."""
    from qwen_edge.export import export
    from qwen_edge.safetensors_io import SafetensorsFile, write_safetensors

    bad = tmp_path / "tampered"
    shutil.copytree(fidelity_ckpt, bad)
    st = SafetensorsFile(bad / "model.safetensors")
    tensors = {n: (i.dtype, i.shape, np.array(st.raw(n))) for n, i in st.tensors.items()}
    st.close()
    a, b = "model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    tensors[a], tensors[b] = tensors[b], tensors[a]
    write_safetensors(bad / "model.safetensors", [(n, d, s, x) for n, (d, s, x) in sorted(tensors.items())])
    art = export(bad, "onnx", "fp32", tmp_path / "out", name="tampered-onnx-fp32")

    r = cli("verify", str(art), "--reference", str(fidelity_ckpt), "--quick", "--json")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] is False and report["reference_matches_source"] is False
    assert "max_abs_logit_error" in report["failed"]
    assert "max_abs_logit_error" in r.stderr


def test_random_weights_are_told_from_trained_ones(fidelity_ckpt, synth_ckpt):
    """Only a `synth` checkpoint relaxes the top-1/greedy gates; the trained fidelity checkpoint keeps all of them."""
    from qwen_edge.checkpoint import Checkpoint

    for path, random in ((synth_ckpt("tiny-qwen3"), True), (fidelity_ckpt, False)):
        ck = Checkpoint(path)
        try:
            assert ck.random_weights is random, path
        finally:
            ck.close()
