"""An arm64 / phone-class device as far as x86 can test it: the default target follows the machine, an ONNX-only
install works without llama-cpp-python (and a GGUF then fails in one line), and `verify --on-device` gates an
artifact against its recorded reference logits with no torch import (issue 16). The arm64 run itself: .ci/arm64."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from broken import break_onnx_weights
from conftest import requires_torch, run_cli

ROOT = Path(__file__).resolve().parents[1]


# --- the default target follows the machine -------------------------------------------------------------------
@pytest.mark.parametrize("machine,want", [("aarch64", "arm64-mobile"), ("arm64", "arm64-mobile"),
                                          ("AArch64", "arm64-mobile"), ("x86_64", "cpu-x86_64"),
                                          ("AMD64", "cpu-x86_64"), ("armv7l", "cpu-x86_64")])
def test_default_target_follows_machine(monkeypatch, machine, want):
    import platform

    from qwen_edge.recipe import recipe_from_args
    from qwen_edge.targets import default_target_name, load_target

    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert default_target_name() == want
    assert load_target(None).name == want
    assert recipe_from_args("ck", "onnx", "int4", None).target == want
    assert recipe_from_args("ck", "onnx", "int4", "cuda").target == "cuda"  # told otherwise
    assert load_target("cpu-x86_64").name == "cpu-x86_64"


def test_runtime_on_arm64_gets_arm64_profile(monkeypatch, exported):
    """load() without a target on an aarch64 machine runs with arm64-mobile's settings (its threads: 4)."""
    import platform

    import qwen_edge

    art = exported("tiny-qwen2", "onnx", "fp32")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with qwen_edge.load(art) as rt:
        assert rt.info.threads == 4
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    with qwen_edge.load(art, threads=1, target="arm64") as rt:
        assert rt.info.threads == 1


# --- llama-cpp-python is an extra -----------------------------------------------------------------------------
def test_llama_cpp_python_is_an_extra_that_the_readme_commands_install():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if d.lower().startswith("llama")], "an ONNX-only device must " \
        "install from wheels alone: llama-cpp-python has no arm64 wheel"
    extras = meta["optional-dependencies"]
    assert any(d.startswith("llama-cpp-python==") for d in extras["llama"])
    readme = (ROOT / "README.md").read_text()
    for cmd in ('pip install -e ".[verify,plot]"', 'pip install -e ".[verify,test]"'):
        assert cmd in readme
    for extra in ("verify", "test"):
        assert "qwen-edge[llama]" in extras[extra], f"[{extra}] must pull in llama.cpp (the README's commands)"


def _blocker(tmp: Path, *modules: str) -> dict[str, str]:
    """Env for a subprocess in which importing `modules` fails (and leaves a marker file saying it was tried)."""
    tmp.mkdir(parents=True, exist_ok=True)
    for m in modules:
        (tmp / f"{m}.py").write_text(f"open({str(tmp / (m + '.tried'))!r}, 'w').close()\n"
                                     f"raise ImportError('{m} is not installed on this device (test)')\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT)])}


def test_gguf_without_llama_cpp_is_one_line_and_onnx_still_runs(tmp_path, exported):
    gguf = exported("tiny-qwen2", "gguf", "f32")
    onnx = exported("tiny-qwen2", "onnx", "fp32")
    env = _blocker(tmp_path / "block", "llama_cpp")
    r = run_cli("generate", str(gguf), "--prompt", "Hi", "--max-new-tokens", "2", env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: GGUF needs llama-cpp-python"), r.stderr
    assert "qwen-edge[llama]" in lines[0]
    (tmp_path / "block" / "llama_cpp.tried").unlink()
    r = run_cli("generate", str(onnx), "--prompt", "Hi", "--max-new-tokens", "2", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output_ids"]
    assert not (tmp_path / "block" / "llama_cpp.tried").exists(), "an ONNX run imported llama_cpp"


# --- verify --on-device ---------------------------------------------------------------------------------------
def test_compact_reference_metrics_match_full_verify():
    """Against the full-logit Accumulator: top-1 and perplexity exact, KL a lower bound, logit errors on top-k."""
    from qwen_edge.verify import Accumulator
    from qwen_edge.verify_device import DeviceAccumulator, Reference, ReferenceRecorder

    rng = np.random.default_rng(0)
    full, dev, rec = Accumulator(), DeviceAccumulator(), ReferenceRecorder()
    windows = []
    for n in (40, 17):
        ids = [int(x) for x in rng.integers(0, 500, n)]
        ref = (rng.normal(size=(n, 500)) * 3).astype(np.float32)
        ref[np.arange(n), rng.integers(0, 500, n)] += 12  # peaked, like trained weights
        art = ref + (rng.normal(size=ref.shape) * 0.2).astype(np.float32)
        rec.add_window(ids, ref)
        full.add(ids, ref, art)
        windows.append((ids, art))
    rec.add_greedy([1, 2, 3])
    r = Reference(json.loads(json.dumps(rec.record("sha", False, 3))), "test")
    pos = nxt = 0
    for ids, art in windows:
        n = len(ids)
        dev.add_compact(ids, art, r.top_ids[pos:pos + n], r.top_logits[pos:pos + n], r.lse[pos:pos + n],
                r.next_logprob[nxt:nxt + n - 1])
        pos, nxt = pos + n, nxt + n - 1
    m, want = dev.metrics(), full.metrics()
    for k in ("top1_agreement", "ppl_reference", "ppl_artifact", "ppl_rel_change"):
        assert m[k] == pytest.approx(want[k], rel=1e-6), k
    assert 0 < m["kl_mean"] <= want["kl_mean"] * (1 + 1e-9)
    assert m["kl_mean"] > 0.5 * want["kl_mean"]  # tight on peaked outputs
    assert 0 < m["max_abs_logit_error"] <= want["max_abs_logit_error"]
    assert m["mean_abs_logit_error"] == pytest.approx(want["mean_abs_logit_error"], rel=0.2)
    assert m["topk_mass_mean"] > 0.9


@pytest.fixture(scope="module")
def verified_fidelity(tmp_path_factory):
    """The trained fidelity checkpoint exported to ONNX fp32 and verified (quick) against torch: it records the
    reference logits."""
    from fidelity import fidelity_checkpoint

    from qwen_edge.export import export
    from qwen_edge.verify import verify

    out = tmp_path_factory.mktemp("device")
    art = export(fidelity_checkpoint(), "onnx", "fp32", out, name="fid-onnx-fp32")
    report = verify(art, quick=True)
    assert report["passed"], report["failed"]
    assert "reference_logits" in json.loads((art / "manifest.json").read_text())
    return art


@requires_torch
def test_on_device_verify_passes_faithful_fails_broken_without_torch(tmp_path, verified_fidelity):
    env = _blocker(tmp_path / "block", "torch", "transformers")
    r = run_cli("verify", str(verified_fidelity), "--on-device", "--json", env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["on_device"] and report["quick"]
    m = report["metrics"]
    assert m["top1_agreement"] == 1.0 and m["greedy_common_prefix_min"] == report["greedy_tokens"]
    assert m["kl_mean"] < 1e-8
    # the same figures the torch verify recorded, where the compact record is exact
    for k in ("top1_agreement", "ppl_reference", "ppl_artifact"):
        assert m[k] == pytest.approx(report["recorded_metrics"][k], rel=1e-5), k

    broken = break_onnx_weights(verified_fidelity, tmp_path / "broken")
    r = run_cli("verify", str(broken), "--on-device", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout and r.stderr.startswith("failed: ")
    assert "kl_mean" in r.stderr
    assert not list((tmp_path / "block").glob("*.tried")), "verify --on-device tried to import torch"


def test_on_device_verify_bad_input_is_one_line(tmp_path, exported):
    art = exported("tiny-qwen2", "onnx", "fp32")  # never verified: no reference logits
    r = run_cli("verify", str(art), "--on-device")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "no reference logits recorded" in r.stderr
    r = run_cli("verify", str(art), "--on-device", "--reference", str(art))
    assert r.returncode == 2 and "do not apply" in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["reference_logits"] = {"version": 1, "eval_text_sha256": "x", "quick": True, "windows_sha256": "y",
                             "window_lengths": [3], "positions": 3, "top_k": 2, "greedy_tokens": 1, "greedy": [],
                             "top_ids": "not base64!", "top_logits": "", "lse": "", "next_logprob": ""}
    (bad / "manifest.json").write_text(json.dumps(m))
    r = run_cli("verify", str(bad), "--on-device")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "reference logits: top_ids does not decode" in r.stderr and "internal error" not in r.stderr, r.stderr


def test_emulation_is_detected_and_said(monkeypatch):
    """An arm64 process whose /proc/cpuinfo is an x86 CPU's (qemu-user) is emulated; bench labels its figures."""
    import platform

    from qwen_edge import hwinfo

    monkeypatch.delenv("QWEN_EDGE_EMULATED", raising=False)
    assert hwinfo.emulation() is None  # this x86 host
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert "qemu" in (hwinfo.emulation() or "")
    monkeypatch.setenv("QWEN_EDGE_EMULATED", "qemu-user, Cortex-A76 model")
    assert hwinfo.emulation() == "qemu-user, Cortex-A76 model"
