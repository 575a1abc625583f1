"""Thread wait policy (`spin`): profile field, load() override, and the value each engine actually runs with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_edge.errors import QwenEdgeError
from qwen_edge.device.targets import load_target

DEFAULT_SPIN = {"cpu-x86_64": "auto", "arm64-mobile": "auto"}
"""The packaged profiles' policy (benchmarks/RESULTS.md, "Busy machine"): per engine, what measured best."""


@pytest.mark.parametrize("name", sorted(DEFAULT_SPIN))
def test_packaged_profiles_spin_auto(name):
    assert load_target(name).spin == DEFAULT_SPIN[name]


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (20, 20), (0, False), ("auto", "auto")])
def test_profile_spin_values(value, expected):
    t = load_target({"name": "mine", "spin": value})
    assert t.spin is expected if isinstance(expected, bool) else t.spin == expected


@pytest.mark.parametrize("cores, busy, expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 3.0, 1), (1, 1.0, 1),
                                                   (8, 1.6, 6)])
def test_auto_threads_leave_busy_cores_alone(cores, busy, expected):
    from qwen_edge.device.targets import auto_threads

    assert auto_threads(cores, busy) == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_busy_cores_counts_a_busy_process():
    from qwen_edge.device.targets import busy_cores

    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        # the loop is runnable in every sample (other processes only add to the count)
        assert busy_cores() >= 0.8
    finally:
        p.kill()
        p.wait()


def test_explicit_threads_do_not_sample(monkeypatch):
    import qwen_edge.device.targets as targets

    def boom():
        raise AssertionError("sampled the machine for an explicit thread count")

    monkeypatch.setattr(targets, "busy_cores", boom)
    assert load_target({"name": "mine", "threads": 3}).resolved_threads() == 3
    monkeypatch.setattr(targets, "busy_cores", lambda: 1.0)
    monkeypatch.setattr(targets, "physical_cores", lambda: 4)
    assert load_target({"name": "mine"}).resolved_threads() == 3


@pytest.mark.parametrize("data, needle", [
    ({"spin": "yes"}, "spin must be true, false, auto or microseconds"),
    ({"spin": -1}, "spin must be"),
    ({"spin": 2.5}, "spin must be"),
    ({"spin": None}, "spin must be"),
    ({"threads": 0}, "threads must be a positive integer or auto"),
    ({"threads": "many"}, "threads must be a positive integer or auto"),
    ({"threads": True}, "threads must be a positive integer or auto"),
])
def test_bad_profile_values_are_one_line_errors(data, needle):
    with pytest.raises(QwenEdgeError) as e:
        load_target({"name": "mine", **data})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_profile_error_names_the_file(tmp_path):
    p = tmp_path / "busy.yaml"
    p.write_text("name: busy\nspin: sometimes\n")
    with pytest.raises(QwenEdgeError, match=r"busy\.yaml: spin must be"):
        load_target(str(p))
    p.write_text("name: busy\nspin: 50\nthreads: 1\n")
    t = load_target(str(p))
    assert (t.spin, t.resolved_threads()) == (50, 1)


# --- onnxruntime: session.intra_op.allow_spinning / spin_duration_us as the session holds them -------------------
@pytest.fixture(scope="module")
def onnx_art(exported):
    pytest.importorskip("onnxruntime")
    return exported("tiny-qwen2", "onnx", "int4")


def _ort_spin(rt) -> tuple[str, str]:
    """(allow_spinning, spin_duration_us or "" when unset) as the live session's options hold them."""
    so = rt._sess.get_session_options()
    try:
        duration = so.get_session_config_entry("session.intra_op.spin_duration_us")
    except Exception:  # onnxruntime raises when the key was never set
        duration = ""
    return so.get_session_config_entry("session.intra_op.allow_spinning"), duration


@pytest.mark.parametrize("busy, kwargs, expected", [
    (0.0, {}, ("1", "")),                       # the packaged default (auto): both threads have a core: spin
    (1.0, {}, ("0", "")),                       # auto beside a busy core: sleep
    (0.3, {"allow_spinning": "auto"}, ("1", "")),
    (1.0, {"allow_spinning": True}, ("1", "")),                               # load() override: onnxruntime's own spin
    (0.0, {"allow_spinning": 30}, ("1", "30")),                           # bounded spin
    (1.0, {"target": {"name": "mine", "spin": True}}, ("1", "")),         # profile override
    (0.0, {"target": {"name": "mine", "spin": 50}, "allow_spinning": False}, ("0", "")),  # load() beats the profile
])
def test_onnx_spin_reaches_the_session(onnx_art, busy, kwargs, expected, monkeypatch):
    from qwen_edge.backends import load
    from qwen_edge.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "busy_cores", lambda: busy)  # what other processes keep busy at load
    monkeypatch.setattr(ort_backend, "physical_cores", lambda: 2)
    kwargs = dict(kwargs)
    target = kwargs.pop("target", None)
    with load(onnx_art, target=target, max_context=64, threads=2, **kwargs) as rt:
        assert _ort_spin(rt) == expected
        assert rt.info.extra["allow_spinning"] == {"0": False}.get(expected[0], int(expected[1]) if expected[1]
                                                                          else True)
        assert rt._sess.get_session_options().intra_op_num_threads == rt.info.threads
        rt.prefill([1, 2, 3])  # and it runs
        assert rt.logits().shape == (rt.info.vocab_size,)


@pytest.mark.parametrize("value", ["yes", -3, 1.5])
def test_onnx_bad_allow_spinning(onnx_art, value):
    from qwen_edge.backends import load

    with pytest.raises(QwenEdgeError, match="allow_spinning must be") as e:
        load(onnx_art, max_context=64, allow_spinning=value)
    assert "\n" not in str(e.value)


# --- llama.cpp: OpenMP's wait policy, read back from the OpenMP runtime of a fresh process ------------------------
CHILD = r"""
import ctypes, json, sys
from qwen_edge.backends import load
kw = json.loads(sys.argv[2])
rt = load(sys.argv[1], max_context=64, **kw)
rt.prefill([1, 2, 3])
gomp = [ln.split()[-1] for ln in open("/proc/self/maps") if "libgomp" in ln]
if not gomp:
    print(json.dumps({"gomp": False}))
    sys.exit(0)
sys.stderr.flush()
ctypes.CDLL(gomp[0]).omp_display_env(1)   # what OpenMP read at load, printed on stderr
print(json.dumps({"gomp": True, "policy": rt.info.extra["omp_wait_policy"], "spin": rt.info.extra["allow_spinning"]}))
"""


@pytest.fixture(scope="module")
def gguf_art(exported):
    pytest.importorskip("llama_cpp")
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    return exported("tiny-qwen3", "gguf", "f16")


def _openmp_settings(art: Path, kwargs: dict, env: dict) -> tuple[dict, dict]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    full.update(env)
    p = subprocess.run([sys.executable, "-c", CHILD, str(art), json.dumps(kwargs)], capture_output=True, text=True,
                       env=full, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if not out["gomp"]:
        pytest.skip("llama.cpp here is built without OpenMP")
    seen = {}
    for line in p.stderr.splitlines():
        k, sep, v = line.strip().partition(" = ")
        if sep and k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            seen[k] = v.strip("'")
    return out, seen


@pytest.mark.parametrize("kwargs, env, policy, spincount", [
    ({}, {}, "", "300000"),                                             # the packaged default: OpenMP's own
    ({"allow_spinning": False}, {}, "PASSIVE", "0"),                    # load() override: no spinning
    ({"target": {"name": "mine", "spin": False}}, {}, "PASSIVE", "0"),  # profile override
    ({"target": {"name": "mine", "spin": 50}}, {}, "PASSIVE", "0"),     # no time-bounded spin in OpenMP
    ({"allow_spinning": True}, {}, "", "300000"),
    ({"allow_spinning": False}, {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE", "30000000000"),  # the user's is kept
])
def test_llama_wait_policy_reaches_openmp(gguf_art, kwargs, env, policy, spincount):
    out, seen = _openmp_settings(gguf_art, kwargs, env)
    assert out["policy"] == policy
    assert seen["GOMP_SPINCOUNT"] == spincount


@pytest.mark.parametrize("value", ["yes", -3])
def test_llama_bad_allow_spinning(gguf_art, value):
    from qwen_edge.backends import load

    with pytest.raises(QwenEdgeError, match="allow_spinning must be") as e:
        load(gguf_art, max_context=64, allow_spinning=value)
    assert "\n" not in str(e.value)


# --- threads: auto reaches both engines as the cores left free -----------------------------------------------------
def test_auto_threads_reach_the_engines(monkeypatch, onnx_art, gguf_art):
    import qwen_edge.device.targets as targets
    from qwen_edge.backends import load

    monkeypatch.setattr(targets, "physical_cores", lambda: 2)
    monkeypatch.setattr(targets, "busy_cores", lambda: 1.0)  # another process holds one of the two cores
    with load(onnx_art, max_context=64) as rt:
        assert rt.info.threads == 1
        assert rt._sess.get_session_options().intra_op_num_threads == 1
    with load(gguf_art, max_context=64) as rt:
        assert rt.info.threads == 1
        assert rt._L.llama_n_threads(rt._ctx) == rt._L.llama_n_threads_batch(rt._ctx) == 1
    monkeypatch.setattr(targets, "busy_cores", lambda: 0.0)
    with load(onnx_art, max_context=64) as rt:
        assert rt._sess.get_session_options().intra_op_num_threads == rt.info.threads == 2
    with load(gguf_art, max_context=64, threads=1) as rt:  # an explicit count wins
        assert rt._L.llama_n_threads(rt._ctx) == 1
