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

    from qwen_edge.recipes.recipe import recipe_from_args
    from qwen_edge.device.targets import default_target_name, load_target

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
    from qwen_edge.quality.verify import Accumulator
    from qwen_edge.quality.reference import Reference, ReferenceRecorder
    from qwen_edge.quality.verify_device import DeviceAccumulator

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
    """The trained fidelity checkpoint exported to ONNX fp32 and verified (quick, 2 threads) against torch: it records
    the reference logits."""
    from fidelity import fidelity_checkpoint

    from qwen_edge.export import export
    from qwen_edge.quality.verify import verify

    out = tmp_path_factory.mktemp("device")
    art = export(fidelity_checkpoint(), "onnx", "fp32", out, name="fid-onnx-fp32")
    report = verify(art, quick=True, threads=2)
    assert report["passed"], report["failed"]
    assert "reference_logits" in json.loads((art / "manifest.json").read_text())
    return art


@requires_torch
def test_on_device_verify_passes_faithful_fails_broken_without_torch(tmp_path, verified_fidelity):
    """Recorded with 2 threads, run here with 1 (another summation order: not a bit-for-bit re-run)."""
    env = _blocker(tmp_path / "block", "torch", "transformers")
    r = run_cli("verify", str(verified_fidelity), "--on-device", "--threads", "1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["on_device"] and report["quick"] and report["threads"] == 1
    assert report["host_passed"] is True and report["recorded_on"]["machine"] == report["machine"]
    m = report["metrics"]
    assert m["top1_agreement"] == 1.0 and m["greedy_common_prefix_min"] == report["greedy_tokens"]
    assert m["kl_mean_bound"] < 1e-8 and m["recorded_mass_mean"] > 0.8
    assert set(report["thresholds"]) == {"max_abs_logit_error_bound", "kl_mean_bound", "kl_p99_bound",
                                         "ppl_rel_change", "top1_agreement", "greedy_common_prefix_mean",
                                         "greedy_common_prefix_min"}
    # the same figures the torch verify recorded, where the compact record is exact
    for k in ("top1_agreement", "ppl_reference", "ppl_artifact"):
        assert m[k] == pytest.approx(report["recorded_metrics"][k], rel=1e-5), k

    r = run_cli("verify", str(verified_fidelity), "--on-device", "--threads", "1", env=env)
    assert r.returncode == 0, r.stderr
    for said in ("(lower bound)", "not covered: contexts beyond the evaluation windows, sampling",
                 "constrained decoding", "host verify (recorded)"):
        assert said in r.stdout, said

    # not only a re-run of what the host ran: the GGUF f32 export of the same checkpoint, on llama.cpp, against the
    # reference recorded while the ONNX export was verified (onnxruntime): a run the host never made
    from fidelity import fidelity_checkpoint

    from qwen_edge.export import export

    gguf = export(fidelity_checkpoint(), "gguf", "f32", tmp_path, name="fid-gguf-f32")
    mf = json.loads((gguf / "manifest.json").read_text())
    mf["reference_logits"] = json.loads((verified_fidelity / "manifest.json").read_text())["reference_logits"]
    (gguf / "manifest.json").write_text(json.dumps(mf))
    r = run_cli("verify", str(gguf), "--on-device", "--threads", "1", "--json", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    g = json.loads(r.stdout)
    assert g["passed"] and g["backend"] == "llama_cpp" and g["metrics"]["top1_agreement"] == 1.0
    assert g["metrics"]["ppl_artifact"] != pytest.approx(m["ppl_artifact"], rel=1e-9, abs=0)  # another run
    assert 0 < g["metrics"]["kl_mean_bound"] < g["thresholds"]["kl_mean_bound"]

    broken = break_onnx_weights(verified_fidelity, tmp_path / "broken")
    r = run_cli("verify", str(broken), "--on-device", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stdout and r.stderr.startswith("failed: ")
    assert "kl_mean_bound" in r.stderr and "host_verify" not in r.stderr  # its own metrics fail it
    assert not list((tmp_path / "block").glob("*.tried")), "verify --on-device tried to import torch"


def _bad_record(art: Path, dst: Path, **fields) -> Path:
    shutil.copytree(art, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["reference_logits"] = {"version": 2, "eval_text_sha256": "x", "quick": True, "windows_sha256": "y",
                             "window_lengths": [3], "positions": 3, "top_k": 2, "greedy_tokens": 1, "greedy": [],
                             "greedy_margins": [], "host": {"passed": True, "failed": []},
                             "top_ids": "not base64!", "top_logits": "", "lse": "", "next_logprob": "", **fields}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _one_line_error(r, needle: str) -> None:
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert needle in r.stderr and "internal error" not in r.stderr, r.stderr


def test_on_device_verify_bad_input_is_one_line(tmp_path, exported):
    art = exported("tiny-qwen2", "onnx", "fp32")  # never verified: no reference logits
    r = run_cli("verify", str(art), "--on-device")
    _one_line_error(r, "no reference logits recorded")
    r = run_cli("verify", str(art), "--on-device", "--reference", str(art))
    assert r.returncode == 2 and "do not apply" in r.stderr
    r = run_cli("verify", str(_bad_record(art, tmp_path / "bad")), "--on-device")
    _one_line_error(r, "reference logits: top_ids does not decode")
    r = run_cli("verify", str(_bad_record(art, tmp_path / "v1", version=1)), "--on-device")
    _one_line_error(r, "reference logits version 1 is not 2")


def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, exported):
    """A crafted record whose packed array inflates far past its stated shape: refused before it is inflated
    (a string longer than the shape can pack to) or while (decompression capped at the shape's bytes)."""
    import base64
    import tracemalloc
    import zlib

    from qwen_edge.errors import QwenEdgeError
    from qwen_edge.quality.reference import _unpack

    bomb = base64.b64encode(zlib.compress(b"\0" * (256 << 20), 9)).decode()  # 256 MiB of zeros in ~350 KB
    art = exported("tiny-qwen2", "onnx", "fp32")
    r = run_cli("verify", str(_bad_record(art, tmp_path / "bomb", top_ids=bomb)), "--on-device")
    _one_line_error(r, "top_ids is longer than 24 bytes can pack to")
    # within the length a shape allows, yet inflating past it: decompression stops at the shape's bytes
    shape = (256, 256)
    small = base64.b64encode(zlib.compress(b"\0" * (64 << 20), 9)).decode()
    assert len(small) < 256 * 256 * 4
    tracemalloc.start()
    with pytest.raises(QwenEdgeError, match="does not unpack to 262144 bytes"):
        _unpack(small, np.int32, shape, "top_ids")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, peak  # not the 64 MiB the stream holds
    good = np.arange(256 * 256, dtype=np.int32).reshape(shape)
    from qwen_edge.quality.reference import _pack

    assert (_unpack(_pack(good), np.int32, shape, "x") == good).all()


@requires_torch
def test_random_weight_record_is_refused_on_device(tmp_path, exported):
    """A random-weight reference's top-k hold ~nothing of its near-uniform outputs: the record cannot bound KL, and
    top-1/greedy are coin tosses there, so the device says it cannot verify (exit 2) instead of a vacuous pass."""
    from qwen_edge.quality.verify import verify

    art = tmp_path / "art"
    shutil.copytree(exported("tiny-qwen3", "onnx", "fp32"), art)
    assert verify(art, quick=True)["passed"]
    r = run_cli("verify", str(art), "--on-device")
    _one_line_error(r, "cannot bound KL for this artifact")


# --- the host gate and the device gate agree (issue 26) --------------------------------------------------------
@pytest.fixture(scope="module")
def degraded_pair(tmp_path_factory):
    """The fidelity checkpoint and a copy with layer 1's MLP weights x1.6, each exported to GGUF q8_0 and ONNX int8
    and verified (quick, 2 threads) against the UNdegraded checkpoint: the records the device checks."""
    from fidelity import degraded_checkpoint, fidelity_checkpoint

    from qwen_edge.export import export
    from qwen_edge.quality.verify import verify

    out = tmp_path_factory.mktemp("degraded")
    good = fidelity_checkpoint()
    bad = degraded_checkpoint(out / "ckpt-mlp1x1.6")
    arts, reports = {}, {}
    for kind, ckpt in (("faithful", good), ("degraded", bad)):
        for fmt, quant in (("gguf", "q8_0"), ("onnx", "int8")):
            art = export(ckpt, fmt, quant, out, name=f"{kind}-{fmt}-{quant}")
            arts[kind, quant] = art
            reports[kind, quant] = verify(art, reference=good, quick=True, threads=2)
    return arts, reports


@requires_torch
@pytest.mark.parametrize("quant", ["q8_0", "int8"])
def test_device_and_host_agree_on_faithful_and_degraded(tmp_path, degraded_pair, quant):
    """Faithful: host and device (1 thread, no torch) pass. Degraded (one layer's MLP x1.6): the host fails it; the
    device refuses it with the host's verdict AND fails it on its own metrics given the faithful artifact's record
    (a record the device cannot lean on the host for)."""
    arts, reports = degraded_pair
    env = _blocker(tmp_path / "block", "torch", "transformers")
    assert reports["faithful", quant]["passed"], reports["faithful", quant]["failed"]
    r = run_cli("verify", str(arts["faithful", quant]), "--on-device", "--threads", "1", "--json", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert json.loads(r.stdout)["passed"]

    host = reports["degraded", quant]
    assert not host["passed"] and "kl_mean" in host["failed"], host["metrics"]
    r = run_cli("verify", str(arts["degraded", quant]), "--on-device", "--threads", "1", "--json", env=env)
    assert r.returncode == 1, r.stderr
    dev = json.loads(r.stdout)
    assert dev["failed"][0] == "host_verify" and dev["host_failed"] == host["failed"]
    assert "kl_mean_bound" in dev["failed"], dev["metrics"]
    assert "the host verify against the PyTorch reference failed" in r.stderr

    # the faithful artifact's record (host passed) on the degraded artifact: the device's own gate fails it
    swapped = tmp_path / "swapped"
    shutil.copytree(arts["degraded", quant], swapped)
    m = json.loads((swapped / "manifest.json").read_text())
    m["reference_logits"] = json.loads((arts["faithful", quant] / "manifest.json").read_text())["reference_logits"]
    (swapped / "manifest.json").write_text(json.dumps(m))
    r = run_cli("verify", str(swapped), "--on-device", "--threads", "1", "--json", env=env)
    assert r.returncode == 1, r.stderr
    dev = json.loads(r.stdout)
    assert "host_verify" not in dev["failed"] and "kl_mean_bound" in dev["failed"], dev["metrics"]
    assert dev["metrics"]["kl_mean_bound"] > 0.5 * host["metrics"]["kl_mean"]  # the bound is near the full KL
    assert not list((tmp_path / "block").glob("*.tried")), "verify --on-device tried to import torch"


def test_emulation_is_detected_and_said(monkeypatch):
    """An arm64 process whose /proc/cpuinfo is an x86 CPU's (qemu-user) is emulated; bench labels its figures."""
    import platform

    from qwen_edge.device import hwinfo

    monkeypatch.delenv("QWEN_EDGE_EMULATED", raising=False)
    assert hwinfo.emulation() is None  # this x86 host
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert "qemu" in (hwinfo.emulation() or "")
    monkeypatch.setenv("QWEN_EDGE_EMULATED", "qemu-user, Cortex-A76 model")
    assert hwinfo.emulation() == "qemu-user, Cortex-A76 model"


# --- CI: an arm64 skip is visible and counted ------------------------------------------------------------------
def _shims(d: Path, **scripts: str) -> dict[str, str]:
    """PATH with these commands replaced by shell scripts (each: its body)."""
    d.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (d / name).write_text("#!/bin/sh\n" + body + "\n")
        (d / name).chmod(0o755)
    return {"PATH": f"{d}:/usr/bin:/bin"}


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="the x86-64 Linux CI host")
def test_arm64_job_skip_is_exit_3_and_a_failure_where_it_can_emulate(tmp_path):
    """Not root: SKIPPED in one line, exit 3 (counted by .ci/run), or exit 1 when QWEN_EDGE_ARM64=required. Root on a
    Debian host (it can emulate) whose tool install fails: a failure (exit 1), not a skip."""
    script = str(ROOT / ".ci" / "arm64")
    env = {**os.environ, **_shims(tmp_path / "user", id="echo 1000")}
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3 and r.stdout.strip() == "arm64: SKIPPED, needs root (mmdebstrap, chroot, binfmt_misc)", r
    r = subprocess.run(["bash", script], capture_output=True, text=True, env={**env, "QWEN_EDGE_ARM64": "required"},
                       timeout=60)
    assert r.returncode == 1 and "cannot run" in r.stderr, r
    # root, apt-get present, the tools missing and their install failing: this host could emulate
    env = {**os.environ, **_shims(tmp_path / "root", id="echo 0", **{"apt-get": "exit 100"}),
           "PYTHON": sys.executable}
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "a skip here would hide a broken arm64 job" in r.stderr, r
    assert "SKIPPED" not in r.stdout


@pytest.mark.parametrize("rc,last", [(3, "CI: passed, 1 job skipped (arm64): no arm64 coverage in this run"),
                                     (0, "CI: passed, 0 jobs skipped"), (1, None)])
def test_ci_run_counts_the_arm64_skip_in_its_last_lines(tmp_path, rc, last):
    """.ci/run's arm64 lines (run as they are, with .ci/arm64 replaced by a stub): a skip ends the log with the skip
    line and the count; a failure fails CI."""
    text = (ROOT / ".ci" / "run").read_text()
    block = text[text.index("# arm64 (issue 16)"):]
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "arm64").write_text(f'echo "arm64: SKIPPED, needs root (test)"; exit {rc}\n' if rc == 3
                                            else f"echo arm64: stub; exit {rc}\n")
    (tmp_path / "run").write_text(f'set -euo pipefail\ntmp="{tmp_path}"\n' + block)
    r = subprocess.run(["bash", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    if last is None:
        assert r.returncode == rc and "CI: FAILED: arm64" in r.stderr, r
        return
    assert r.returncode == 0, r
    tail = r.stdout.strip().splitlines()[-3:]
    assert tail[-1] == last, tail
    if rc == 3:
        assert tail[-2] == "CI: arm64 arm64: SKIPPED, needs root (test)", tail
