"""GGUF export: every quantization on every tiny architecture, metadata, Modelfile, reproducibility, bad input."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from qwen_edge.errors import QwenEdgeError
from qwen_edge.export.gguf import QUANTS as ALL_GGUF
from qwen_edge.formats.quants import QUANTS as QUANT_TABLE
from qwen_edge.formats.gguf import check_gguf_file, gguf_file_info, read_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

QUANTS = tuple(q for q in ALL_GGUF if not QUANT_TABLE[q].needs_imatrix)
"""The types that need an importance matrix are tested on 256-wide rows in tests/test_imatrix.py."""
ARCHS = ("tiny-qwen2", "tiny-qwen2-untied", "tiny-qwen3", "tiny-qwen3-untied")


def _reader(path: Path):
    return gguf.GGUFReader(path)


def _field(r, key):
    f = r.fields[key]
    return f.contents()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", QUANTS)
def test_every_quant_exports_loads_and_generates(exported, arch, quant):
    from qwen_edge.backends import load

    art = exported(arch, "gguf", quant)
    manifest = json.loads((art / "manifest.json").read_text())
    q = manifest["quantization"]
    g = read_gguf(art / "model.gguf")
    # the manifest lists exactly the tensor types in the file (the parser itself is cross-checked against
    # gguf-py's GGUFReader in test_gguf_file_info_agrees_with_gguf_reader)
    actual = {t.name: t.type_name for t in g.tensors}
    assert q["tensor_types"] == actual
    assert q["requested"] == quant and manifest["quant"] == quant
    assert sum(q["type_counts"].values()) == len(actual)
    n_params = sum(t.n_elements for t in g.tensors)
    assert n_params == json.loads((art / "manifest.json").read_text())["quantization"]["parameters"]
    n_bytes = sum(t.nbytes for t in g.tensors)
    assert q["bits_per_weight"] == pytest.approx(8 * n_bytes / n_params, abs=1e-3)
    assert g.size >= g.data_offset + n_bytes
    assert set(q["fallbacks"]) <= set(actual)
    for name, fb in q["fallbacks"].items():
        assert actual[name] == fb["type"] != q["base_type"]
    # norms and biases stay f32; nothing is left un-quantized silently
    for t in g.tensors:
        if len(t.shape) == 1:
            assert t.type_name == "F32", t.name
        elif t.type_name != q["base_type"]:
            assert t.name in q["fallbacks"]
    tied = "untied" not in arch
    assert ("output.weight" in actual) is (not tied)
    assert ("blk.0.attn_q_norm.weight" in actual) is ("qwen3" in arch)
    assert ("blk.0.attn_q.bias" in actual) is ("qwen2" in arch)
    assert {f["path"] for f in manifest["files"]} >= {"model.gguf", "Modelfile", "tokenizer.json",
                                                       "chat_template.jinja", "generation_config.json"}
    assert not [p.name for p in art.iterdir() if p.name.startswith(".")]  # no temp file left behind
    with load(art, max_context=256) as rt:
        rt.prefill([9707, 11, 1879, 0])
        out = []
        for _ in range(4):
            t = int(np.argmax(rt.logits()))
            assert 0 <= t < 151936
            out.append(t)
            rt.decode(t)
        assert rt.n_cached == 8


def test_metadata_matches_llama_cpp_conventions(exported, synth_ckpt):
    art = exported("tiny-qwen3", "gguf", "f16")
    r = _reader(art / "model.gguf")
    cfg = json.loads((synth_ckpt("tiny-qwen3") / "config.json").read_text())
    assert _field(r, "general.architecture") == "qwen3"
    assert _field(r, "general.file_type") == 1
    assert _field(r, "general.quantization_version") == 2
    assert _field(r, "general.name") and _field(r, "general.size_label")
    assert _field(r, "qwen3.context_length") == cfg["max_position_embeddings"]
    assert _field(r, "qwen3.embedding_length") == cfg["hidden_size"]
    assert _field(r, "qwen3.block_count") == cfg["num_hidden_layers"]
    assert _field(r, "qwen3.feed_forward_length") == cfg["intermediate_size"]
    assert _field(r, "qwen3.attention.head_count") == cfg["num_attention_heads"]
    assert _field(r, "qwen3.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert _field(r, "qwen3.attention.key_length") == cfg["head_dim"] == _field(r, "qwen3.attention.value_length")
    assert _field(r, "qwen3.rope.freq_base") == pytest.approx(cfg["rope_theta"])
    assert _field(r, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "qwen2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 151936
    assert tokens[151645] == "<|im_end|>" and types[151645] == gguf.TokenType.CONTROL
    assert tokens[151667] == "<think>" and types[151667] == gguf.TokenType.USER_DEFINED
    assert tokens[151935] == "[PAD151935]" and types[151935] == gguf.TokenType.UNUSED
    assert tokens[9707] == "Hello" and types[9707] == gguf.TokenType.NORMAL
    assert len(_field(r, "tokenizer.ggml.merges")) > 150000
    assert _field(r, "tokenizer.ggml.bos_token_id") == 151643
    assert _field(r, "tokenizer.ggml.eos_token_id") == 151645
    assert _field(r, "tokenizer.ggml.padding_token_id") == 151643
    assert _field(r, "tokenizer.ggml.add_bos_token") is False
    assert _field(r, "tokenizer.chat_template") == (art / "chat_template.jinja").read_text()
    # qwen2 writes no key/value length when head_dim = hidden / heads
    g2 = read_gguf(exported("tiny-qwen2", "gguf", "f16") / "model.gguf")
    assert "qwen2.attention.key_length" not in g2.kv and g2.kv["qwen2.attention.head_count"] == 4


def test_gguf_file_info_agrees_with_gguf_reader(exported):
    art = exported("tiny-qwen2-untied", "gguf", "q4_k_m")
    info = gguf_file_info(art / "model.gguf")
    r = _reader(art / "model.gguf")
    assert info["architecture"] == "qwen2" and info["quant"] == "Q4_K_M"
    counts: dict[str, int] = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    assert info["tensor_types"] == counts
    g = read_gguf(art / "model.gguf")
    mine = {t.name: (t.type_name, list(t.shape), g.data_offset + t.offset, t.nbytes) for t in g.tensors}
    theirs = {t.name: (t.tensor_type.name, [int(x) for x in t.shape], int(t.data_offset), int(t.n_bytes))
              for t in r.tensors}
    assert mine == theirs
    for key in ("general.architecture", "general.file_type", "qwen2.block_count", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template", "tokenizer.ggml.add_bos_token"):
        assert g.kv[key] == _field(r, key), key
    assert info["tokenizer"]["vocab_size"] == 151936 and info["tokenizer"]["add_bos_token"] is False
    assert info["hyperparameters"]["block_count"] == 2
    assert info["chat_template"].startswith("{%")
    manifest = json.loads((art / "manifest.json").read_text())
    assert info["bits_per_weight"] == pytest.approx(manifest["quantization"]["bits_per_weight"], abs=1e-3)


def test_modelfile(exported):
    art = exported("tiny-qwen2", "gguf", "q8_0")
    text = (art / "Modelfile").read_text()
    gen = json.loads((art / "generation_config.json").read_text())
    assert text.startswith("FROM ./model.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert f"PARAMETER temperature {gen['temperature']}" in text
    assert f"PARAMETER top_p {gen['top_p']}" in text
    assert f"PARAMETER top_k {gen['top_k']}" in text
    assert f"PARAMETER repeat_penalty {gen['repetition_penalty']}" in text
    tmpl = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "<|im_start|>{{" not in tmpl and "<|im_start|>user\n{{ .Content }}<|im_end|>" in tmpl
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in tmpl  # Qwen2.5 default
    opened = re.findall(r"\{\{-?\s*(?:if|range|with)\b", tmpl)
    assert len(opened) == len(re.findall(r"\{\{-?\s*end\s*-?\}\}", tmpl))  # balanced Go template blocks
    q3 = (exported("tiny-qwen3", "gguf", "q8_0") / "Modelfile").read_text()
    assert "You are Qwen" not in q3 and "PARAMETER min_p" in q3


@pytest.mark.parametrize("quant", ["f16", "q4_0", "q4_k_m"])
def test_export_is_reproducible(synth_ckpt, tmp_path, quant):
    from qwen_edge.export import export

    ck = synth_ckpt("tiny-qwen2-untied")
    a = export(ck, "gguf", quant, tmp_path / "a", name="m")
    b = export(ck, "gguf", quant, tmp_path / "b", name="m")
    assert (a / "model.gguf").read_bytes() == (b / "model.gguf").read_bytes()
    assert (a / "Modelfile").read_bytes() == (b / "Modelfile").read_bytes()


def test_bf16_and_f32_keep_the_checkpoint_values(exported, synth_ckpt):
    from qwen_edge.model.checkpoint import Checkpoint

    ck = Checkpoint(synth_ckpt("tiny-qwen3"))
    want = ck.tensor("model.layers.1.mlp.down_proj.weight")
    for quant in ("bf16", "f32"):
        path = exported("tiny-qwen3", "gguf", quant) / "model.gguf"
        g = read_gguf(path)
        t = next(t for t in g.tensors if t.name == "blk.1.ffn_down.weight")
        raw = np.fromfile(path, dtype=np.uint8, count=t.nbytes, offset=g.data_offset + t.offset)
        got = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.type)).reshape(want.shape)
        np.testing.assert_array_equal(got, want)  # the checkpoint is bf16: both are exact
    ck.close()


# --- bad input --------------------------------------------------------------------------------------------------

def _copy_gguf(exported, tmp_path) -> Path:
    src = exported("tiny-qwen3", "gguf", "q8_0") / "model.gguf"
    dst = tmp_path / "model.gguf"
    shutil.copyfile(src, dst)
    return dst


@pytest.mark.parametrize("cut", [0, 10, 23, 100, 4_000_000, -1000, -1])
def test_truncated_gguf_is_an_error(exported, tmp_path, cut):
    p = _copy_gguf(exported, tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(QwenEdgeError, match="model.gguf"):
        check_gguf_file(p)


def _tensor_table_offset(p: Path) -> int:
    """Byte offset of the first tensor-info entry (after the metadata)."""
    g = read_gguf(p)
    pos = g.data_offset
    # walk back: the table ends at or before data_offset; find the first tensor name in the file
    name = g.tensors[0].name.encode()
    start = p.read_bytes().rfind(struct.pack("<Q", len(name)) + name, 0, pos)
    assert start > 0
    return start


@pytest.mark.parametrize("where", ["magic", "version", "n_tensors", "n_kv", "kv_type", "tensor_type",
                                   "tensor_dims", "tensor_offset", "head_count", "block_count_zero"])
def test_bit_flipped_header_is_an_error(exported, tmp_path, where):
    p = _copy_gguf(exported, tmp_path)
    data = bytearray(p.read_bytes())
    if where == "magic":
        data[1] ^= 0x01
    elif where == "version":
        data[4] ^= 0x40
    elif where == "n_tensors":
        data[8 + 5] ^= 0x10
    elif where == "n_kv":
        data[16 + 4] ^= 0x01
    elif where == "kv_type":
        klen = struct.unpack_from("<Q", data, 24)[0]
        data[32 + klen] ^= 0x20  # type of the first metadata value
    else:
        t0 = _tensor_table_offset(p)
        name_len = struct.unpack_from("<Q", data, t0)[0]
        dims_at = t0 + 8 + name_len
        n_dims = struct.unpack_from("<I", data, dims_at)[0]
        type_at = dims_at + 4 + 8 * n_dims
        if where == "tensor_type":
            data[type_at] ^= 0x7F
        elif where == "tensor_dims":
            data[dims_at + 4 + 8 + 3] ^= 0x01  # ne[1] of the first tensor grows by 2^24
        elif where == "tensor_offset":
            data[type_at + 4] ^= 0x03
        elif where in ("head_count", "block_count_zero"):
            key = b"qwen3.attention.head_count" if where == "head_count" else b"qwen3.block_count"
            at = data.find(struct.pack("<Q", len(key)) + key) + 8 + len(key)
            assert struct.unpack_from("<I", data, at)[0] == 4  # uint32
            struct.pack_into("<I", data, at + 4, 0 if where == "block_count_zero" else 3)
    p.write_bytes(bytes(data))
    with pytest.raises(QwenEdgeError, match="model.gguf"):
        check_gguf_file(p)


def test_checkpoint_with_missing_tensor(synth_ckpt, tmp_path):
    from qwen_edge.model.checkpoint import Checkpoint
    from qwen_edge.export import export
    from qwen_edge.export.gguf import export_gguf
    from qwen_edge.model.safetensors_io import write_safetensors

    src = synth_ckpt("tiny-qwen2")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    ck = Checkpoint(src)
    drop = "model.layers.1.mlp.up_proj.weight"
    items = [(n, ck.tensor_info(n).dtype, ck.tensor_info(n).shape, np.array(ck.raw(n)))
             for n in ck.tensor_names() if n != drop]
    ck.close()
    write_safetensors(bad / "model.safetensors", items)
    with pytest.raises(QwenEdgeError, match="up_proj"):
        export(bad, "gguf", "f16", tmp_path / "out")
    assert not (tmp_path / "out" / "bad-gguf-f16").exists()
    # the exporter checks on its own too (a checkpoint opened without validation)
    loose = Checkpoint(bad, validate=False)
    out = tmp_path / "loose"
    out.mkdir()
    with pytest.raises(QwenEdgeError, match="up_proj"):
        export_gguf(loose, out, "f16", target=None, options={}, tokenizer={})
    assert not list(out.iterdir())
    loose.close()


def test_unknown_quant_and_option(synth_ckpt, tmp_path):
    from qwen_edge.export import export

    with pytest.raises(QwenEdgeError, match="q4_k_m"):
        export(synth_ckpt("tiny-qwen3"), "gguf", "q7_x", tmp_path)
    with pytest.raises(QwenEdgeError, match="unknown gguf option"):
        export(synth_ckpt("tiny-qwen3"), "gguf", "f16", tmp_path, options={"bogus": 1})


def test_cli_inspect_bad_gguf_exits_2(exported, tmp_path, cli):
    p = _copy_gguf(exported, tmp_path)
    p.write_bytes(p.read_bytes()[:5000])
    res = cli("inspect", str(p))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.gguf" in lines[0]
    assert "Traceback" not in res.stderr


def test_cli_inspect_gguf_json(exported, cli):
    art = exported("tiny-qwen3", "gguf", "q4_0")
    res = cli("inspect", str(art / "model.gguf"), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["format"] == "gguf" and info["architecture"] == "qwen3"
    assert info["bits_per_weight"] > 4
