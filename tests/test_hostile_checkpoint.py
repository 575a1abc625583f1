"""Hostile checkpoints: mutated safetensors, config.json and shard index are rejected with one clean line."""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile
from qwen_edge.model.checkpoint import Checkpoint
from qwen_edge.errors import QwenEdgeError
from qwen_edge.model.safetensors_io import SafetensorsFile

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def ckpt_dir(synth_ckpt) -> Path:
    return synth_ckpt("tiny-qwen3")


@pytest.fixture(scope="module")
def st_bytes(ckpt_dir) -> bytes:
    return (ckpt_dir / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def header_len(st_bytes) -> int:
    return struct.unpack("<Q", st_bytes[:8])[0]


def _ckpt_with(src: Path, tmp: Path, **files: bytes | str) -> Path:
    """A checkpoint dir in `tmp` holding src's config.json + model.safetensors, with some files replaced."""
    d = tmp / "ckpt"
    d.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if name not in files:
            (d / name).symlink_to(src / name) if name == "tokenizer.json" else shutil.copyfile(src / name, d / name)
    if "model.safetensors" not in files:
        (d / "model.safetensors").symlink_to(src / "model.safetensors")
    for name, data in files.items():
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return d


def _loads_fully(path: Path) -> None:
    """A checkpoint that opens must also serve every tensor with its declared shape."""
    ck = Checkpoint(path)
    try:
        for name in ck.tensor_names():
            arr = ck.raw(name)
            assert arr.shape == ck.tensor_info(name).shape
    finally:
        ck.close()


def test_valid_checkpoint_loads(ckpt_dir):
    _loads_fully(ckpt_dir)


# --- safetensors -----------------------------------------------------------------------------------------------
@SETTINGS
@given(frac=st.floats(0.0, 0.9999))
def test_truncated_safetensors_rejected(ckpt_dir, st_bytes, frac):
    with hostile.scratch() as t:
        d = _ckpt_with(ckpt_dir, Path(t), **{"model.safetensors": hostile.truncate(st_bytes, int(len(st_bytes) * frac))})
        hostile.expect_rejected("checkpoint/truncated-safetensors", lambda: Checkpoint(d))


@SETTINGS
@given(data=st.data())
def test_bitflipped_safetensors_header_clean(ckpt_dir, st_bytes, header_len, data):
    """Flipping bits in the header either gives a clean rejection or a checkpoint that still reads fully."""
    n = data.draw(st.integers(1, 8))
    positions = data.draw(st.lists(st.integers(0, (8 + header_len) * 8 - 1), min_size=n, max_size=n))
    with hostile.scratch() as t:
        d = _ckpt_with(ckpt_dir, Path(t), **{"model.safetensors": hostile.flip_bits(st_bytes, positions)})
        hostile.TRIED["checkpoint/bitflip-header"] += 1
        try:
            _loads_fully(d)
        except QwenEdgeError as e:
            assert str(e) and "\n" not in str(e)
        hostile.REJECTED["checkpoint/bitflip-header"] += 1


@SETTINGS
@given(hlen=st.one_of(st.integers(2**27, 2**64 - 1), st.integers(0, 7)))
def test_oversized_header_length_rejected(ckpt_dir, st_bytes, hlen):
    with hostile.scratch() as t:
        d = _ckpt_with(ckpt_dir, Path(t), **{"model.safetensors": struct.pack("<Q", hlen) + st_bytes[8:]})
        hostile.expect_rejected("checkpoint/header-length", lambda: Checkpoint(d))


def _st_file(header: object, data: bytes = b"\0" * 64) -> bytes:
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(h)) + h + data


DIM = st.one_of(st.integers(-3, 8), st.integers(2**31, 2**63), st.floats(allow_nan=True), st.text(max_size=3),
                st.none(), st.booleans())
ENTRY = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "F8_E4M3", "Q4", "", "f32"]),
                       st.integers(), st.none()),
    "shape": st.one_of(st.lists(DIM, max_size=5), st.integers(), st.text(max_size=4)),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 2**64), min_size=0, max_size=3),
                              st.tuples(st.just(0), st.integers(0, 128)).map(list)),
})


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=8), st.one_of(ENTRY, st.integers(), st.text(max_size=4),
                                                               st.lists(st.integers(), max_size=2)),
                              min_size=1, max_size=4))
def test_crafted_safetensors_header(header):
    """Absurd shapes, dtypes and offsets: a clean rejection, or every tensor readable with its declared shape."""
    with hostile.scratch() as t:
        p = Path(t) / "x.safetensors"
        p.write_bytes(_st_file(header))
        hostile.TRIED["safetensors/crafted-header"] += 1
        try:
            f = SafetensorsFile(p)
        except QwenEdgeError as e:
            assert str(e) and "\n" not in str(e)
        else:
            for name, info in f.tensors.items():
                assert f.raw(name).shape == info.shape
            f.close()
        hostile.REJECTED["safetensors/crafted-header"] += 1


@pytest.mark.parametrize("case", ["overflow-shape", "overflow-shape-3d", "bool-shape", "float-dim", "nan-dim",
                                  "deep-json", "not-object", "invalid-utf8", "nan-json"])
def test_specific_hostile_safetensors(tmp_path, case):
    big = 2**32
    headers = {
        "overflow-shape": {"w": {"dtype": "F32", "shape": [big, big], "data_offsets": [0, 0]}},
        "overflow-shape-3d": {"w": {"dtype": "U8", "shape": [2**21, 2**21, 2**22], "data_offsets": [0, 0]}},
        "bool-shape": {"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}},
        "float-dim": {"w": {"dtype": "F32", "shape": [2.5, 4], "data_offsets": [0, 32]}},
        "nan-dim": b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}',
        "deep-json": hostile.deep_json(200_000).encode(),
        "not-object": b"[1,2,3]",
        "invalid-utf8": b'{"w\xff\xfe":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        "nan-json": b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,NaN]}}',
    }
    p = tmp_path / "x.safetensors"
    p.write_bytes(_st_file(headers[case]))
    hostile.expect_rejected(f"safetensors/{case}", lambda: _open_and_read(p))


def _open_and_read(p: Path) -> None:
    f = SafetensorsFile(p)
    for name in f.tensors:
        f.raw(name)
    f.close()


# --- config.json and the shard index ----------------------------------------------------------------------------
def _config(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / "config.json").read_text())


CONFIG_CASES = {
    "nan-hidden": lambda c: json.dumps(c).replace('"hidden_size": 64', '"hidden_size": NaN'),
    "inf-layers": lambda c: json.dumps(c).replace('"num_hidden_layers": 2', '"num_hidden_layers": 1e400'),
    "inf-rope": lambda c: json.dumps(c).replace('"rope_theta": 1000000.0', '"rope_theta": Infinity'),
    "nan-eps": lambda c: json.dumps({**c, "rms_norm_eps": float("nan")}),
    "neg-hidden": lambda c: json.dumps({**c, "hidden_size": -64}),
    "zero-heads": lambda c: json.dumps({**c, "num_attention_heads": 0}),
    "huge-vocab": lambda c: json.dumps({**c, "vocab_size": 2**40}),
    "huge-int": lambda c: json.dumps({**c, "intermediate_size": 10**400}),
    "string-int": lambda c: json.dumps({**c, "hidden_size": "sixty-four"}),
    "list-int": lambda c: json.dumps({**c, "num_hidden_layers": [2]}),
    "dict-int": lambda c: json.dumps({**c, "vocab_size": {"a": 1}}),
    "wrong-model-type": lambda c: json.dumps({**c, "model_type": "llama"}),
    "unhashable-model-type": lambda c: json.dumps({**c, "model_type": ["qwen3"]}),
    "missing-key": lambda c: json.dumps({k: v for k, v in c.items() if k != "hidden_size"}),
    "deep-json": lambda c: hostile.deep_json(100_000),
    "huge-string": lambda c: json.dumps({**c, "model_type": "q" * 5_000_000}),
    "not-object": lambda c: "[]",
    "invalid-utf8": lambda c: b"\xff\xfe{}",
    "empty": lambda c: "",
    "kv-mismatch": lambda c: json.dumps({**c, "num_key_value_heads": 3}),
    "odd-head-dim": lambda c: json.dumps({**c, "head_dim": 33}),
    "shape-mismatch": lambda c: json.dumps({**c, "intermediate_size": 256}),
    "rope-scaling": lambda c: json.dumps({**c, "rope_scaling": {"type": "yarn", "factor": 4}}),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_hostile_config(ckpt_dir, tmp_path, case):
    d = _ckpt_with(ckpt_dir, tmp_path, **{"config.json": CONFIG_CASES[case](_config(ckpt_dir))})
    hostile.expect_rejected(f"checkpoint/config-{case}", lambda: Checkpoint(d))


INDEX_CASES = {
    "dotdot": {"weight_map": {"a": "../model.safetensors"}},
    "absolute": {"weight_map": {"a": "/etc/passwd"}},
    "mixed-types": {"weight_map": {"a": "model.safetensors", "b": 3}},
    "unhashable": {"weight_map": {"a": ["model.safetensors"]}},
    "missing-shard": {"weight_map": {"a": "model-00002-of-00002.safetensors"}},
    "empty": {"weight_map": {}},
    "not-dict": {"weight_map": ["model.safetensors"]},
    "top-list": [1, 2],
    "nul-byte": {"weight_map": {"a": "model\u0000.safetensors"}},
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_hostile_shard_index(ckpt_dir, tmp_path, case):
    d = _ckpt_with(ckpt_dir, tmp_path, **{"model.safetensors.index.json": json.dumps(INDEX_CASES[case])})
    hostile.expect_rejected(f"checkpoint/index-{case}", lambda: Checkpoint(d))


def test_missing_and_not_a_directory(tmp_path):
    hostile.expect_rejected("checkpoint/missing-dir", lambda: Checkpoint(tmp_path / "nope"))
    f = tmp_path / "file"
    f.write_text("x")
    hostile.expect_rejected("checkpoint/file-not-dir", lambda: Checkpoint(f))
    (tmp_path / "empty").mkdir()
    hostile.expect_rejected("checkpoint/empty-dir", lambda: Checkpoint(tmp_path / "empty"))


def test_pickle_weights_refused(ckpt_dir, tmp_path):
    """A checkpoint with only pickle weights is refused (never unpickled: arbitrary code)."""
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copyfile(ckpt_dir / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")
    hostile.expect_rejected("checkpoint/pickle-only", lambda: Checkpoint(d), match="pickle")


def test_safetensors_that_is_a_directory(ckpt_dir, tmp_path):
    d = _ckpt_with(ckpt_dir, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    hostile.expect_rejected("checkpoint/weights-is-dir", lambda: Checkpoint(d))


def test_math_sanity():
    assert math.prod([2**32, 2**32]) == 2**64 and int(np.prod([2**32, 2**32], dtype=np.int64)) == 0
