"""`qwen-edge inspect` on artifact directories and bare .gguf/.onnx files, as text and JSON."""

from __future__ import annotations

import json

import pytest

from qwen_edge.errors import QwenEdgeError
from qwen_edge.cli.inspect import inspect, render_inspect


@pytest.mark.parametrize("fmt,quant", [("gguf", "q4_k_m"), ("onnx", "int4")])
def test_inspect_artifact(exported, fmt, quant):
    art = exported("tiny-qwen3", fmt, quant)
    info = inspect(art)
    assert {"format", "architecture", "quant", "bits_per_weight", "files"} <= set(info)  # the contract keys
    assert (info["format"], info["quant"]) == (fmt, quant)
    assert info["architecture"]["family"] == "qwen3" and info["architecture"]["num_layers"] == 2
    assert info["bits_per_weight"] > 0 and info["size_bytes"] == sum(f["bytes"] for f in info["files"])
    assert sum(info["type_counts"].values()) == len(info["tensor_types"]) > 0
    assert info["tokenizer"]["stop_ids"][0] == 151645 and info["tokenizer"]["tokens"] > 151000
    assert info["template"]["thinking"] is True and "<think>" in info["template"]["text"]
    assert info["context_length"] > 0 and info["parity"] is None
    text = render_inspect(info)
    for needle in (f"{fmt} {quant}", "bits/weight", "2 layers", "tensors", "tokenizer", "template", "not verified",
                   info["model_file"]):
        assert needle in text
    keys = [line.split("  ")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert keys == sorted(set(keys), key=keys.index)  # one row per key, aligned


def test_inspect_bare_gguf_and_onnx(exported):
    g = inspect(exported("tiny-qwen2", "gguf", "q8_0") / "model.gguf")
    assert g["format"] == "gguf" and g["bits_per_weight"] > 8 and g["architecture"] == "qwen2"
    assert "gguf" in render_inspect(g) and "tensors" in render_inspect(g)
    o = inspect(exported("tiny-qwen2", "onnx", "int4") / "model.onnx")
    assert o["format"] == "onnx" and o["size_bytes"] > 0
    assert "onnx" in render_inspect(o)


@pytest.mark.parametrize("as_json", [True, False])
def test_inspect_cli(cli, exported, as_json):
    art = exported("tiny-qwen3", "gguf", "q4_k_m")
    for target in (art, art / "model.gguf", exported("tiny-qwen3", "onnx", "int4") / "model.onnx"):
        r = cli("inspect", str(target), *(["--json"] if as_json else []))
        assert r.returncode == 0, r.stderr
        if as_json:
            doc = json.loads(r.stdout)
            assert doc["format"] in ("gguf", "onnx") and "bits_per_weight" in doc
        else:
            assert r.stdout.startswith("path") and "format" in r.stdout


def test_inspect_bad_paths(tmp_path, exported, cli):
    with pytest.raises(QwenEdgeError, match="no such file"):
        inspect(tmp_path / "missing")
    (tmp_path / "x.bin").write_bytes(b"\0" * 16)
    with pytest.raises(QwenEdgeError, match="not an artifact directory"):
        inspect(tmp_path / "x.bin")
    with pytest.raises(QwenEdgeError, match="manifest"):
        inspect(tmp_path)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 12)
    r = cli("inspect", str(tmp_path / "bad.gguf"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_inspect_detects_a_tampered_artifact(exported, tmp_path):
    import shutil

    src = exported("tiny-qwen2", "gguf", "q8_0")
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    with open(dst / "tokenizer.json", "r+b") as f:
        f.seek(100)
        f.write(b"X")
    with pytest.raises(QwenEdgeError, match="sha256"):
        inspect(dst)


@pytest.mark.parametrize("fmt,quant,options,dtype,itemsize", [
    ("onnx", "int4", {}, "float32", 4), ("onnx", "fp16", {}, "float16", 2),
    ("onnx", "int4", {"kv_dtype": "float16"}, "float16", 2), ("gguf", "q8_0", {}, "float16", 2),
])
def test_inspect_reports_kv_cache_bytes(exported, fmt, quant, options, dtype, itemsize):
    """KV bytes per token and at the context load() allocates by default on the artifact's target (cpu-x86_64:
    4096 tokens, no memory cap)."""
    info = inspect(exported("tiny-qwen3", fmt, quant, **options))
    kv = info["kv_cache"]
    per_token = 2 * 2 * 2 * 32 * itemsize  # K+V x layers x kv heads x head_dim x bytes
    assert kv["dtype"] == dtype and kv["bytes_per_token"] == per_token
    assert kv["context"] == 4096 and kv["bytes"] == 4096 * per_token and kv["target"] == "cpu-x86_64"
    text = render_inspect(info)
    line = next(x for x in text.splitlines() if x.startswith("kv cache"))
    assert f" {dtype} · {per_token / 1024:.1f} KiB/token · " in line and "at 4096 tokens" in line
