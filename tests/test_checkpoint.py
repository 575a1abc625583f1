"""Checkpoint reading and validation: every defect is a one-line error naming the file and the problem."""

import json
import shutil
import struct

import numpy as np
import pytest

from qwen_edge.model.checkpoint import Checkpoint, expected_tensors
from qwen_edge.errors import QwenEdgeError
from qwen_edge.model.safetensors_io import SafetensorsFile, bf16_to_f32, f32_to_bf16, write_safetensors


@pytest.fixture
def ckpt_copy(synth_ckpt, tmp_path):
    src = synth_ckpt("tiny-qwen2")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_reads_tiny_checkpoint(synth_ckpt):
    c = Checkpoint(synth_ckpt("tiny-qwen3"))
    assert c.arch.family == "qwen3"
    assert set(c.tensor_names()) == set(expected_tensors(c.arch))
    emb = c.tensor("model.embed_tokens.weight")
    assert emb.dtype == np.float32 and emb.shape == (151936, 64)
    assert c.tensor_info("model.embed_tokens.weight").dtype == "BF16"
    assert len(c.weights_sha256) == 64


def test_bf16_round_trip_is_exact_for_bf16_values():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    b = f32_to_bf16(x)
    assert np.array_equal(f32_to_bf16(bf16_to_f32(b)), b)
    assert np.max(np.abs(bf16_to_f32(b) - x) / np.abs(x)) < 2 ** -8


def test_sharded_checkpoint_with_index(ckpt_copy):
    c = Checkpoint(ckpt_copy)
    names = c.tensor_names()
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    arrays = {n: np.array(c.raw(n)) for n in names}
    infos = {n: c.tensor_info(n) for n in names}
    c.close()
    (ckpt_copy / "model.safetensors").unlink()
    weight_map = {}
    for fname, ns in shards.items():
        write_safetensors(ckpt_copy / fname, [(n, infos[n].dtype, infos[n].shape, arrays[n]) for n in ns])
        weight_map.update({n: fname for n in ns})
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    c2 = Checkpoint(ckpt_copy)
    assert len(c2.files) == 2
    assert np.array_equal(c2.raw("model.norm.weight"), arrays["model.norm.weight"])


def test_missing_config(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(QwenEdgeError, match="config.json: file not found"):
        Checkpoint(ckpt_copy)


def test_truncated_safetensors(ckpt_copy):
    p = ckpt_copy / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(QwenEdgeError, match="model.safetensors: truncated"):
        Checkpoint(ckpt_copy)


def test_corrupt_header_length(ckpt_copy):
    p = ckpt_copy / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 60)
    p.write_bytes(bytes(data))
    with pytest.raises(QwenEdgeError, match="corrupt safetensors header length"):
        SafetensorsFile(p)


def test_unknown_architecture(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QwenEdgeError, match="unsupported architecture"):
        Checkpoint(ckpt_copy)


def test_shape_mismatch(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QwenEdgeError, match=r"mlp.*has shape \[128, 64\], config implies \[256, 64\]"):
        Checkpoint(ckpt_copy)


def test_missing_tensor(ckpt_copy):
    c = Checkpoint(ckpt_copy)
    keep = [n for n in c.tensor_names() if n != "model.layers.1.mlp.up_proj.weight"]
    items = [(n, c.tensor_info(n).dtype, c.tensor_info(n).shape, np.array(c.raw(n))) for n in keep]
    c.close()
    write_safetensors(ckpt_copy / "model.safetensors", items)
    with pytest.raises(QwenEdgeError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        Checkpoint(ckpt_copy)


def test_not_a_directory(tmp_path):
    with pytest.raises(QwenEdgeError, match="no such checkpoint directory"):
        from qwen_edge.model.checkpoint import open_checkpoint

        open_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("defect", ["missing_config", "truncated", "unknown_arch", "shape"])
def test_cli_exit_2_one_line(ckpt_copy, tmp_path, cli, defect):
    if defect == "missing_config":
        (ckpt_copy / "config.json").unlink()
    elif defect == "truncated":
        p = ckpt_copy / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-4096])
    else:
        cfg = json.loads((ckpt_copy / "config.json").read_text())
        if defect == "unknown_arch":
            cfg["model_type"] = "gpt2"
        else:
            cfg["hidden_size"] = 128
        (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    r = cli("export", str(ckpt_copy), "--format", "gguf", "--quant", "f16", "-o", str(tmp_path / "out"),
            "--no-verify")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
