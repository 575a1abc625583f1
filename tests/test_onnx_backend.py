"""onnxruntime backend: KV reuse and rewind, batched logits, limits, and clean errors on damaged artifacts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qwen_edge.backends import load
from qwen_edge.model.checkpoint import sha256_file
from qwen_edge.errors import QwenEdgeError
from runtime_contract import (artifact_facts, assert_cli_max_context_refused, assert_info_describes_artifact,
                              assert_max_context_bounded, assert_rewind_reuses_prefix)

A = [151644, 872, 198, 9707, 11, 1879, 0, 3555]
B = [525, 498, 30, 151645, 198]
C = [151644, 77091, 198, 40, 2776]


@pytest.fixture(scope="module")
def art(exported):
    return exported("tiny-qwen3", "onnx", "fp32")


def test_info_and_default_context(art):
    with load(art, threads=1) as rt:
        assert rt.info.backend == "onnxruntime" and rt.info.format == "onnx" and rt.info.quant == "fp32"
        assert rt.info.context_length == 4096  # min(target max_context, artifact context), not the model's 32K
        assert rt.info.threads == 1 and rt.info.vocab_size == 151936
        assert rt.info.extra["kv_cache_bytes"] == 2 * 2 * 2 * 4096 * 32 * 4
        assert 151645 in rt.info.extra["stop_ids"]
        assert_info_describes_artifact(rt, *artifact_facts(art))


def test_max_context_beyond_the_artifact_is_an_error(art, cli):
    ctx, _ = artifact_facts(art)
    assert_max_context_bounded(load, art, ctx, threads=1)
    assert_cli_max_context_refused(cli, art, ctx)


def test_rewind_reuses_prefix(art):
    with load(art, threads=1) as rt:
        assert_rewind_reuses_prefix(rt, A, B, C, atol=1e-5)


def test_prefill_all_logits_equals_step_by_step(art):
    with load(art, threads=1) as rt:
        rt.prefill(A[:3])
        batched = rt.prefill_all_logits(A[3:] + B)
        last = rt.logits()
        rt.reset()
        rt.prefill(A[:3])
        steps = []
        for t in A[3:] + B:
            rt.decode(t)
            steps.append(rt.logits())
    np.testing.assert_allclose(batched, np.stack(steps), atol=1e-5)
    np.testing.assert_array_equal(last, batched[-1])


def test_chunked_prefill_matches_one_pass(art):
    with load(art, threads=1, prefill_chunk=3) as rt:
        chunked = rt.prefill_all_logits(A + B + C)
    with load(art, threads=1) as rt:
        rt.prefill(A + B + C)
        one = rt.logits()
    np.testing.assert_allclose(chunked[-1], one, atol=1e-5)


def test_limits(art):
    with load(art, threads=1, max_context=8) as rt:
        assert rt.info.context_length == 8
        rt.prefill(A)
        with pytest.raises(QwenEdgeError, match="context full"):
            rt.decode(1)
        with pytest.raises(QwenEdgeError, match="cannot rewind"):
            rt.rewind(9)
        rt.rewind(2)
        with pytest.raises(QwenEdgeError, match="outside the vocabulary"):
            rt.prefill([151936])
        assert rt.n_cached == 2
    with pytest.raises(QwenEdgeError, match="max_context"):
        load(art, max_context=1 << 20)
    with pytest.raises(QwenEdgeError, match="unknown option"):
        load(art, colour="red")
    rt = load(art, threads=1)
    rt.close()
    with pytest.raises(QwenEdgeError, match="closed"):
        rt.prefill(A)


def test_cuda_unavailable_is_a_clear_error(art):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(QwenEdgeError, match="CUDAExecutionProvider"):
        load(art, device="cuda")


def _copy(art, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(art, dst)
    return dst


def _rehash(root, rel):
    """Make the manifest agree with a damaged file so the ONNX-level checks are what catches it."""
    m = json.loads((root / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] == rel:
            f["bytes"] = (root / rel).stat().st_size
            f["sha256"] = sha256_file(root / rel)
    (root / "manifest.json").write_text(json.dumps(m))


def _truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


@pytest.mark.parametrize("damage,match", [
    ("truncate", "truncated"),
    ("truncate_rehashed", "truncated"),
    ("missing_data", "missing"),
    ("garbage_model_rehashed", "not a valid ONNX model"),
])
def test_damaged_artifacts_raise(art, tmp_path, damage, match, cli):
    d = _copy(art, tmp_path)
    data = d / "model.onnx_data"
    if damage.startswith("truncate"):
        _truncate(data, data.stat().st_size // 2)
        if damage.endswith("rehashed"):
            _rehash(d, "model.onnx_data")
    elif damage == "missing_data":
        data.unlink()
    elif damage == "garbage_model_rehashed":
        (d / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
        _rehash(d, "model.onnx")
    with pytest.raises(QwenEdgeError, match=match):
        load(d)
    r = cli("generate", str(d), "--prompt", "hi", "--max-new-tokens", "2")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_load_checks_sizes_and_graph_not_hashes(art, tmp_path, cli):
    """load() reads no weights: a same-size altered byte in the middle of model.onnx_data passes it (only the sha256
    can tell), and load(check_hashes=True) and `inspect` catch it."""
    d = _copy(art, tmp_path)
    data = d / "model.onnx_data"
    with open(data, "r+b") as f:
        f.seek(data.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    with load(d, threads=1, max_context=16) as rt:
        rt.prefill(A)
    with pytest.raises(QwenEdgeError, match="sha256"):
        load(d, threads=1, max_context=16, check_hashes=True)
    r = cli("inspect", str(d))
    assert r.returncode == 2 and "sha256" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_inspect_onnx(art, cli, tmp_path):
    r = cli("inspect", str(art / "model.onnx"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "onnx" and info["ops"]["GroupQueryAttention"] == 2
    d = _copy(art, tmp_path)
    _truncate(d / "model.onnx_data", 100)
    r = cli("inspect", str(d / "model.onnx"))
    assert r.returncode == 2 and "truncated" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("inspect", str(d))
    assert r.returncode == 2 and r.stderr.startswith("error: ")


def test_int4_loads_lm_head_first_and_matches_plain_session(exported):
    """The backend hands onnxruntime the graph with the biggest MatMulNBits (the LM head) first, so its raw weight is
    packed and released before the layers' packed copies exist (lower load peak); results equal a plain session's."""
    import onnx
    import onnxruntime as ort

    from qwen_edge.backends.onnxruntime import _prepack_largest_first

    art = exported("tiny-qwen2", "onnx", "int4")
    proto = onnx.load(str(art / "model.onnx"), load_external_data=False)
    known = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer} | {""}
    for node in proto.graph.node:  # the file itself stays topologically sorted
        assert set(node.input) <= known, node.name
        known.update(node.output)
    reordered = onnx.load_from_string(_prepack_largest_first(proto))
    first = reordered.graph.node[0]
    assert first.op_type == "MatMulNBits" and first.input[1] == "lm_head.weight_Q8"
    assert sorted(n.name for n in reordered.graph.node) == sorted(n.name for n in proto.graph.node)

    ids = np.array([A], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.size)[None]}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    plain = ort.InferenceSession(str(art / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feeds.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
                  for i in plain.get_inputs() if i.name.startswith("past_key_values.")})
    want = plain.run(["logits"], feeds)[0][0, -1]
    with load(art, threads=1) as rt:
        rt.prefill(A)
        np.testing.assert_allclose(rt.logits(), want, atol=1e-5)


def test_idle_mapped_weights_leave_the_resident_set(exported):
    """After load, the tied int4 embedding (a view over the LM head's bytes) is advised random-access and dropped
    from the page cache, and MatMulNBits scales (copied into the packed weights) are paged out; output unchanged."""
    import sys

    from qwen_edge.formats.onnx import load_onnx_proto, weight_uses

    art = exported("tiny-qwen2", "onnx", "int4")
    uses = weight_uses(load_onnx_proto(art / "model.onnx"))
    view = [r for r, k in uses.items() if k == {"gather", "packed"}]
    assert len(view) == 1 and view[0][2] >= 151936 * 64  # the head's 8-bit data, gathered and packed
    assert not [r for r, k in uses.items() if k == {"gather"}]  # no second copy of the table
    with load(art, threads=1) as rt:
        mapped = rt.info.extra["mapped_weights"]
        if sys.platform.startswith("linux"):
            assert mapped["gather_only_bytes"] == view[0][2]  # found mapped (1 MiB+ tensors are page aligned)
        rt.prefill(A)
        got = rt.logits()
        for t in B:
            rt.decode(t)
        after = rt.logits()
    with load(art, threads=1) as rt:
        rt.prefill(A)
        np.testing.assert_array_equal(rt.logits(), got)  # a reload that re-reads the dropped pages agrees
        for t in B:
            rt.decode(t)
        np.testing.assert_array_equal(rt.logits(), after)


def _target_yaml(tmp_path, name: str, **fields) -> str:
    import yaml

    from qwen_edge.device.targets import load_target

    d = {k: v for k, v in load_target("cpu-x86_64").to_dict().items()}
    d.update(name=name, **fields)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def test_memory_cap_sizes_the_default_context(exported, tmp_path):
    """With memory_cap_mb, load(max_context=None) picks min(profile max_context, artifact context, the largest
    multiple of 256 tokens whose KV cache fits beside the model): here a cap 1024 tokens of fp16 KV above the model
    (rounded up to a whole MiB, 2048 more tokens at most)."""
    from qwen_edge.model.artifact import Artifact
    from qwen_edge.backends.base import kv_bytes_per_token

    art = exported("tiny-qwen3", "onnx", "int4", kv_dtype="float16")  # 2 layers x 2 kv heads x 32 x 2 (k, v) x 2 B
    a = Artifact.open(art, check_hashes=False)
    per_token = kv_bytes_per_token(a.manifest)
    assert per_token == 2 * 2 * 2 * 32 * 2
    cap_mb = -(-(a.size_bytes + 1024 * per_token) // 2**20)  # rounded up to whole MiB
    fit = (cap_mb * 2**20 - a.size_bytes) // per_token // 256 * 256
    assert 1024 <= fit <= 3072
    capped = _target_yaml(tmp_path, "capped", memory_cap_mb=cap_mb, max_context=4096)
    with load(art, threads=1, target=capped) as rt:
        assert rt.info.context_length == fit
        assert rt.info.extra["kv_cache_bytes"] == fit * per_token
        assert a.size_bytes + rt.info.extra["kv_cache_bytes"] <= cap_mb * 2**20
    with load(art, threads=1, target=capped, max_context=4096) as rt:  # asked for: no cap
        assert rt.info.context_length == 4096
    roomy = _target_yaml(tmp_path, "roomy", memory_cap_mb=cap_mb + 64, max_context=512)  # the profile's is smaller
    with load(art, threads=1, target=roomy) as rt:
        assert rt.info.context_length == 512
    with load(art, threads=1, target="arm64-mobile") as rt:  # 3072 MiB: a tiny model fits 2048 tokens easily
        assert rt.info.context_length == 2048


def test_memory_cap_below_the_model_keeps_a_minimal_context_and_warns(exported, tmp_path, caplog):
    art = exported("tiny-qwen3", "onnx", "int4", kv_dtype="float16")
    tiny_cap = _target_yaml(tmp_path, "tiny-cap", memory_cap_mb=1)
    with caplog.at_level("WARNING", logger="qwen_edge"):
        with load(art, threads=1, target=tiny_cap) as rt:
            assert rt.info.context_length == 256
    assert "memory cap of 1 MiB" in caplog.text


def test_memory_cap_applies_to_gguf_too(exported, tmp_path):
    from qwen_edge.model.artifact import Artifact

    art = exported("tiny-qwen3", "gguf", "q8_0")
    a = Artifact.open(art, check_hashes=False)
    per_token = 2 * 2 * 2 * 32 * 2  # llama.cpp's f16 cache
    cap_mb = -(-(a.size_bytes + 700 * per_token) // 2**20)
    fit = (cap_mb * 2**20 - a.size_bytes) // per_token // 256 * 256
    with load(art, threads=1, target=_target_yaml(tmp_path, "capped-gguf", memory_cap_mb=cap_mb)) as rt:
        assert rt.info.context_length == fit < 4096


def test_load_does_not_import_onnx(exported):
    """Loading and running an ONNX artifact in a fresh process imports only what the ONNX path needs (issue 24: load()
    within 1.3x the bare InferenceSession, imports included): never the `onnx` package (its import, mostly ml_dtypes,
    cost 0.8 s of a 2.3 s load on a 2-core Intel VM; the graph is read with formats/onnx_proto.py), nor gguf-py
    (~0.04 s, through .checkpoint/.families), psutil (the core count comes from sysfs on Linux) or the llama.cpp
    modules (llama_bufts: ctypes, subprocess)."""
    import subprocess
    import sys

    art = exported("tiny-qwen2", "onnx", "int4")
    unwanted = ("onnx", "ml_dtypes", "gguf", "qwen_edge.model.checkpoint", "qwen_edge.families",
                "qwen_edge.device.llama_bufts", "qwen_edge.device.llama_lib", "llama_cpp") \
        + (("psutil",) if sys.platform == "linux" else ())
    code = ("import sys, qwen_edge\n"
            f"rt = qwen_edge.load({str(art)!r}, threads=1)\n"
            f"rt.prefill({A!r})\n"
            "assert rt.logits().shape[-1] == 151936\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {unwanted!r} or m in {unwanted!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_onnx_backend_says_what_it_runs_for_the_crash_line(exported, tmp_path, monkeypatch):
    """Under the supervised CLI a native crash in onnxruntime is reported naming the artifact's model file (issue 24:
    a crash anywhere is one line naming the artifact), as the llama.cpp backend does."""
    art = exported("tiny-qwen2", "onnx", "int4")
    note = tmp_path / "note"
    monkeypatch.setenv("QWEN_EDGE_CRASH_NOTE", str(note))
    load(art, threads=1).close()
    assert note.read_text() == f"onnxruntime running {art / 'model.onnx'}"


def test_graph_subset_round_trips_every_field(exported, tmp_path):
    """The subset schema keeps what it does not declare: an int4 and an fp16 graph with fields qwen-edge never reads
    added (doc strings, metadata, value_info, a float-list attribute), as a user's tool may leave them, serialize
    back to the same model, and the LM-head-first order that load hands onnxruntime is that model to the `onnx`
    package, node for node."""
    import onnx

    from qwen_edge.backends.onnxruntime import _prepack_largest_first
    from qwen_edge.formats.onnx import load_onnx_proto

    for quant in ("int4", "fp16"):
        src = exported("tiny-qwen2", "onnx", quant) / "model.onnx"
        assert load_onnx_proto(src).SerializeToString() == src.read_bytes()
        want = onnx.load_model(str(src), load_external_data=False)
        want.doc_string = "edited"
        onnx.helper.set_model_props(want, {"app": "x"})
        want.graph.value_info.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
        want.graph.node[0].doc_string = "node doc"
        want.graph.node[0].attribute.append(onnx.helper.make_attribute("unused_floats", [0.5, 1.5]))
        want.graph.initializer[0].doc_string = "tensor doc"
        path = tmp_path / f"{quant}.onnx"
        onnx.save_model(want, str(path))
        assert onnx.load_from_string(load_onnx_proto(path).SerializeToString()) == want
        got = onnx.load_from_string(_prepack_largest_first(load_onnx_proto(path)))
        assert sorted(n.SerializeToString() for n in got.graph.node) == \
            sorted(n.SerializeToString() for n in want.graph.node)
        del got.graph.node[:], want.graph.node[:]
        assert got == want
