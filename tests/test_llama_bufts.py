"""Every CPU its users have (issue 24): llama.cpp's extra CPU buffer types decided per machine, native crashes
reported as such.

On Intel CPUs with AMX, llama.cpp's AMX buffer type segfaults on prompt batches of quantized models. The decision
(qwen_edge/device/llama_bufts.py) is pinned here with the CPU's extra buffer types and the probe's verdicts monkeypatched;
the mechanism that narrows llama.cpp's list is exercised for real on this machine by treating CPU_REPACK as the type
to leave out; prompt batches of every common GGUF quant run through generate, bench, verify and serve on a 256-wide
model (the shapes that take the fast kernels); and a crash in a child (the CLI's, a bench worker's, the probe's) is
one line and exit 1, naming the signal and what was running.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import requires_torch
from qwen_edge.device import llama_bufts
from qwen_edge.errors import NativeCrash, QwenEdgeError

pytest.importorskip("llama_cpp")

ARCH = "tiny-qwen3-256"
COMMON_QUANTS = ("q8_0", "q4_0", "q4_k_m", "iq4_xs")


def _never(mode, available):
    raise AssertionError(f"probed {mode} on {available}")


class _Probe:
    def __init__(self, **verdicts: str):
        self.verdicts, self.calls = verdicts, []

    def __call__(self, mode, available):
        self.calls.append(mode)
        return self.verdicts[mode]


# --- the decision --------------------------------------------------------------------------------------------------
def test_no_amx_keeps_llama_cpps_own_choice_without_a_probe(monkeypatch):
    monkeypatch.setattr(llama_bufts, "available_extra_buffers", lambda L: ["CPU_REPACK"])
    d = llama_bufts.decide(None, "auto", probe=_never)
    assert (d.mode, d.allowed) == ("all", ["CPU_REPACK"])
    monkeypatch.setattr(llama_bufts, "available_extra_buffers", lambda L: [])
    assert llama_bufts.decide(None, "auto", probe=_never).mode == "all"


def test_amx_that_crashes_the_probe_is_left_out_and_repack_kept(monkeypatch):
    monkeypatch.setattr(llama_bufts, "available_extra_buffers", lambda L: ["AMX", "CPU_REPACK"])
    probe = _Probe(all="crashed with SIGSEGV", repack="ok")
    d = llama_bufts.decide(None, "auto", probe=probe)
    assert (d.mode, d.allowed, probe.calls) == ("repack", ["CPU_REPACK"], ["all", "repack"])
    assert "SIGSEGV" in d.reason


def test_amx_that_runs_is_kept(monkeypatch):
    """A llama.cpp build whose AMX kernels work: the probe passes and the weights may go to AMX again."""
    monkeypatch.setattr(llama_bufts, "available_extra_buffers", lambda L: ["AMX", "CPU_REPACK"])
    d = llama_bufts.decide(None, "auto", probe=_Probe(all="ok"))
    assert (d.mode, d.allowed) == ("all", ["AMX", "CPU_REPACK"])


def test_when_every_extra_type_crashes_none_is_used(monkeypatch):
    monkeypatch.setattr(llama_bufts, "available_extra_buffers", lambda L: ["AMX", "CPU_REPACK"])
    d = llama_bufts.decide(None, "auto", probe=_Probe(all="crashed with SIGSEGV", repack="crashed with SIGILL"))
    assert (d.mode, d.allowed) == ("none", [])
    monkeypatch.setattr(llama_bufts, "available_extra_buffers", lambda L: ["AMX"])
    assert llama_bufts.decide(None, "auto", probe=_Probe(all="timed out after 300 s")).mode == "none"


def test_an_explicit_policy_is_applied_without_a_probe(monkeypatch):
    monkeypatch.setattr(llama_bufts, "available_extra_buffers", lambda L: ["AMX", "CPU_REPACK"])
    for policy, allowed in (("all", ["AMX", "CPU_REPACK"]), ("repack", ["CPU_REPACK"]), ("none", [])):
        d = llama_bufts.decide(None, policy, probe=_never)
        assert (d.mode, d.allowed) == (policy, allowed)


def test_policy_sources_option_then_environment_then_profile(monkeypatch):
    from qwen_edge.device.targets import load_target

    monkeypatch.delenv(llama_bufts.ENV, raising=False)
    prof = load_target({"name": "t", "llama_extra_buffers": "repack"})
    assert llama_bufts.policy_for(None, prof) == "repack"
    assert llama_bufts.policy_for(None, load_target("cpu")) == "auto"
    monkeypatch.setenv(llama_bufts.ENV, "none")
    assert llama_bufts.policy_for(None, prof) == "none"
    assert llama_bufts.policy_for("all", prof) == "all"
    monkeypatch.setenv(llama_bufts.ENV, "fast")
    with pytest.raises(QwenEdgeError, match=llama_bufts.ENV):
        llama_bufts.policy_for(None, prof)
    with pytest.raises(QwenEdgeError, match="llama_extra_buffers"):
        load_target({"name": "t", "llama_extra_buffers": "amx"})


# --- the mechanism, for real -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def q4_0(synth_ckpt, exported):
    return exported(ARCH, "gguf", "q4_0")


def _load(art, **kw):
    from qwen_edge import load

    return load(art, max_context=256, threads=2, **kw)


def test_weights_go_where_the_policy_says_and_the_list_is_restored(q4_0, monkeypatch):
    """q4_0 rows of 256 take llama.cpp's CPU_REPACK kernels on x86-64 (AVX2) and arm64; `none` keeps them out. Then
    CPU_REPACK stands in for AMX (the type `repack` leaves out): the narrowed list keeps it out of the load, and
    llama.cpp's list is whole again after."""
    monkeypatch.delenv(llama_bufts.ENV, raising=False)
    import llama_cpp

    available = llama_bufts.available_extra_buffers(llama_cpp)
    if "CPU_REPACK" not in available:
        pytest.skip(f"this llama.cpp build has no CPU_REPACK buffer type ({available})")
    rt = _load(q4_0, extra_buffers="all")
    eb = rt.info.extra["extra_buffers"]
    assert (eb["mode"], eb["policy"]) == ("all", "all") and eb["weights"].get("CPU_REPACK", 0) > 0, eb
    ids = list(range(100, 140))
    want = rt.prefill_all_logits(ids)
    rt.close()
    rt = _load(q4_0, extra_buffers="none")
    eb = rt.info.extra["extra_buffers"]
    assert eb["mode"] == "none" and "CPU_REPACK" not in eb["weights"] and eb["weights"], eb
    plain = rt.prefill_all_logits(ids)
    rt.close()
    assert abs(plain - want).max() < 0.05 * abs(want).max()  # the same model through other kernels

    ex = llama_bufts._extra_list(llama_cpp)
    monkeypatch.setattr(ex, "names", ["AMX" if n == "CPU_REPACK" else n for n in ex.names])
    rt = _load(q4_0, extra_buffers="repack")
    eb = rt.info.extra["extra_buffers"]
    assert eb["mode"] == "repack" and "CPU_REPACK" not in eb["weights"], eb
    rt.close()
    monkeypatch.undo()
    assert llama_bufts.available_extra_buffers(llama_cpp) == available
    rt = _load(q4_0)  # auto, no AMX here: llama.cpp's own choice again
    assert rt.info.extra["extra_buffers"]["mode"] == "all"
    assert rt.info.extra["extra_buffers"]["weights"].get("CPU_REPACK", 0) > 0
    rt.close()


def test_verbose_says_which_buffer_types_hold_the_weights(q4_0, cli):
    r = cli("-v", "generate", str(q4_0), "--prompt", "hello there, how are you", "--max-new-tokens", "2", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if "llama.cpp weights in" in ln)
    assert "CPU_REPACK" in line and "policy auto" in line, line


# --- the probe ---------------------------------------------------------------------------------------------------
def test_the_probe_runs_every_common_quant_here_and_its_verdict_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_EDGE_CACHE_DIR", str(tmp_path))
    assert llama_bufts.run_probe("all") == "ok"
    assert sorted(p.name for p in tmp_path.glob("llama-probe-models-*/*") if p.name != "checkpoint") == \
        sorted(COMMON_QUANTS)
    calls = []
    monkeypatch.setattr(llama_bufts, "run_probe", lambda mode: calls.append(mode) or "crashed with SIGSEGV")
    assert llama_bufts.cached_probe("all", ["AMX", "CPU_REPACK"]) == "crashed with SIGSEGV"
    assert llama_bufts.cached_probe("all", ["AMX", "CPU_REPACK"]) == "crashed with SIGSEGV"
    assert calls == ["all"]  # the second answer came from the cache
    (record,) = tmp_path.glob("llama-extra-buffers-*.json")
    assert json.loads(record.read_text())["verdicts"] == {"all": "crashed with SIGSEGV"}
    record.write_text("{not json")  # a corrupt cache entry is probed again, never trusted
    assert llama_bufts.cached_probe("all", ["AMX", "CPU_REPACK"]) == "crashed with SIGSEGV" and len(calls) == 2


def test_a_probe_child_that_segfaults_is_a_crash_verdict():
    crash = [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]
    assert llama_bufts.run_probe("all", command=crash) == "crashed with SIGSEGV"
    fail = [sys.executable, "-c", "import sys; sys.exit('error: no model')"]
    assert llama_bufts.run_probe("all", command=fail) == "failed: error: no model"


# --- prompt batches of every common quant through every verb -----------------------------------------------------
@pytest.fixture(scope="module", params=COMMON_QUANTS)
def quantized(request, exported):
    return exported(ARCH, "gguf", request.param)


def test_prompt_batches_of_every_common_quant_run_through_generate_and_bench(quantized):
    from qwen_edge import bench, generate, load

    rt = load(quantized, max_context=256, threads=2)
    try:
        out = generate(rt, list(range(200, 264)), max_new_tokens=6)  # a 64-token prompt batch, then decode steps
        assert len(out.output_ids) == 6
    finally:
        rt.close()
    res = bench([quantized], prompt_tokens=64, gen_tokens=4, repeat=1, warmup=0)["results"][0]
    assert res["prefill_tokens_per_s"]["median"] > 0 and res["prompt_tokens"] == 64


@requires_torch
def test_prompt_batches_of_every_common_quant_run_through_verify(quantized, synth_ckpt):
    from qwen_edge import verify

    report = verify(quantized, reference=synth_ckpt(ARCH), quick=True, store=False)
    m = report["metrics"]
    assert 0 <= m["kl_mean"] < 1 and 0 < m["top1_agreement"] <= 1, m  # the logits of every window came back


def test_prompt_batches_of_every_common_quant_run_through_serve(quantized, tmp_path):
    from test_serve import Server

    s = Server(quantized, tmp_path / "serve.log")
    try:
        status, body = s.post("/v1/chat/completions", {
            "model": "m", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me about rivers and foxes in detail. " * 4}]}, key=None)
        assert status == 200 and body["usage"]["prompt_tokens"] > 32, body
        assert s.health()["status"] == "ok"
    finally:
        assert s.stop() == 0, s.log()


# --- crashes reported as such -----------------------------------------------------------------------------------
def test_a_bench_worker_killed_by_a_signal_is_a_native_crash_naming_it():
    from qwen_edge.bench.run import in_child

    ctx = multiprocessing.get_context("spawn")
    with pytest.raises(NativeCrash, match=r"x\.gguf \(qwen-edge, 2 threads\): the engine crashed with SIGSEGV"):
        in_child(ctx, ctypes.string_at, 0, "x.gguf (qwen-edge, 2 threads)")
    with pytest.raises(ValueError):  # an ordinary exception in the worker is raised as itself
        in_child(ctx, int, "not a number", "x")
    assert in_child(ctx, abs, -3, "x") == 3


def test_the_cli_crashing_in_native_code_is_one_line_and_exit_1(tmp_path):
    from qwen_edge.supervisor import _supervise

    note = tmp_path / "note"
    code = ("import ctypes, os; from qwen_edge.errors import crash_note; "
            "crash_note('llama.cpp running /a/model.gguf'); ctypes.string_at(0)")
    r = subprocess.run([sys.executable, "-c",
                        "import sys; from qwen_edge.supervisor import _supervise; "
                        f"sys.exit(_supervise([], {str(note)!r}, 'QWEN_EDGE_CRASH_NOTE', "
                        f"[sys.executable, '-c', {code!r}]))"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: qwen-edge crashed with SIGSEGV in native code while llama.cpp running "
                           "/a/model.gguf") and "QWEN_EDGE_LLAMA_EXTRA_BUFFERS=none" in last, r.stderr
    assert _supervise([], str(note), "QWEN_EDGE_CRASH_NOTE", [sys.executable, "-c", "exit(3)"]) == 3
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert _supervise([], str(note), "QWEN_EDGE_CRASH_NOTE", killed) == 1  # the OOM killer's signal: a failed run


def test_the_llama_backend_says_what_it_runs_for_the_crash_line(q4_0, tmp_path, monkeypatch):
    note = tmp_path / "note"
    monkeypatch.setenv("QWEN_EDGE_CRASH_NOTE", str(note))
    _load(q4_0).close()
    assert note.read_text() == f"llama.cpp running {q4_0 / 'model.gguf'}"


def test_signals_sent_to_the_command_reach_the_cli(tmp_path):
    child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); "
             "print('ready', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c",
                          "import sys; from qwen_edge.supervisor import _supervise; "
                          f"sys.exit(_supervise([], {str(tmp_path / 'n')!r}, 'QWEN_EDGE_CRASH_NOTE', "
                          f"[sys.executable, '-c', {child!r}]))"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 7


def test_the_console_command_runs_the_cli_under_the_supervisor():
    from importlib import metadata

    (ep,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "qwen-edge"]
    assert ep.value == "qwen_edge.supervisor:main"


@requires_torch
def test_an_artifact_whose_verify_never_finished_is_verified_by_the_next_export(cli, synth_ckpt, tmp_path):
    """A crash in verify leaves the exported artifact without a parity record (the state --no-verify leaves too):
    the next export keeps the files but runs the gate instead of reporting the artifact as done."""
    base = ["export", str(synth_ckpt("tiny-qwen3")), "--format", "gguf", "--quant", "q8_0", "-o", str(tmp_path)]
    first = cli(*base, "--no-verify")
    assert first.returncode == 0, first.stderr
    (art,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((art / "manifest.json").read_text()).get("parity") is None
    again = cli(*base)
    assert again.returncode == 0, again.stderr
    assert "export skipped" in again.stderr and "verify passed" in again.stderr, again.stderr
    assert "recorded" not in again.stderr and json.loads((art / "manifest.json").read_text())["parity"]["passed"]
    assert "--force" in cli(*base, "-v").stderr  # the skip names the CLI flag that rebuilds


def test_the_cli_dies_with_its_supervisor(tmp_path):
    """SIGKILL to the command (which it cannot forward) still ends the CLI: no orphan holds the model or the port."""
    pid_file = tmp_path / "pid"
    child = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c",
                          "import sys; from qwen_edge.supervisor import _supervise; "
                          f"sys.exit(_supervise([], {str(tmp_path / 'n')!r}, 'QWEN_EDGE_CRASH_NOTE', "
                          f"[sys.executable, '-c', {child!r}]))"])
    deadline = time.monotonic() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    p.kill()
    p.wait(30)
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the CLI outlived its supervisor"
        time.sleep(0.05)
