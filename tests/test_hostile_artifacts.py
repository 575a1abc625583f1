"""Hostile model files: mutated GGUF and ONNX are rejected in Python before llama.cpp or onnxruntime see them."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile
from qwen_edge.errors import QwenEdgeError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TENSOR = b"token_embd.weight"


@pytest.fixture(scope="module")
def gguf_art(exported) -> Path:
    hostile.require_module("qwen_edge.formats.gguf")
    return exported("tiny-qwen3", "gguf", "q8_0")


@pytest.fixture(scope="module")
def gguf_bytes(gguf_art) -> bytes:
    return (gguf_art / "model.gguf").read_bytes()


@pytest.fixture(scope="module")
def layout(gguf_bytes) -> dict[str, int]:
    """Byte offsets of the header fields the mutations aim at."""
    from qwen_edge.formats.gguf import read_gguf

    name_at = gguf_bytes.rfind(struct.pack("<Q", len(TENSOR)) + TENSOR)
    assert name_at > 0
    dims_at = name_at + 8 + len(TENSOR) + 4
    with hostile.scratch() as t:
        p = Path(t) / "m.gguf"
        p.write_bytes(gguf_bytes)
        g = read_gguf(p)
    return {"n_tensors": 8, "n_kv": 16, "first_key_len": 24, "tensor_name_len": name_at,
            "tensor_ndims": name_at + 8 + len(TENSOR), "tensor_dim0": dims_at,
            "tensor_type": dims_at + 8 * 2, "tensor_offset": dims_at + 8 * 2 + 4,
            "data_offset": g.data_offset}


def _check(data: bytes) -> None:
    from qwen_edge.formats.gguf import check_gguf_file

    with hostile.scratch() as t:
        p = Path(t) / "m.gguf"
        p.write_bytes(data)
        check_gguf_file(p)


def test_valid_gguf_passes(gguf_bytes):
    _check(gguf_bytes)


# --- GGUF, API level (pure Python, no native code) ------------------------------------------------------------
@SETTINGS
@given(frac=st.floats(0.0, 0.99999))
def test_truncated_gguf_rejected(gguf_bytes, frac):
    data = hostile.truncate(gguf_bytes, int(len(gguf_bytes) * frac))
    hostile.expect_rejected("gguf/truncated", lambda: _check(data))


@SETTINGS
@given(data=st.data())
def test_bitflipped_gguf_header_clean(gguf_bytes, layout, data):
    """Bit flips in the header/metadata/tensor table: a clean rejection or a file that still parses fully."""
    n = data.draw(st.integers(1, 4))
    pos = data.draw(st.lists(st.integers(0, layout["data_offset"] * 8 - 1), min_size=n, max_size=n))
    mutated = hostile.flip_bits(gguf_bytes, pos)
    hostile.TRIED["gguf/bitflip-header"] += 1
    try:
        _check(mutated)
    except QwenEdgeError as e:
        assert str(e) and "\n" not in str(e) and len(str(e)) < 2000, str(e)[:300]
    hostile.REJECTED["gguf/bitflip-header"] += 1


FIELDS = {
    "n_tensors": "<Q", "n_kv": "<Q", "first_key_len": "<Q", "tensor_name_len": "<Q", "tensor_ndims": "<I",
    "tensor_dim0": "<Q", "tensor_type": "<I", "tensor_offset": "<Q",
}
HUGE = st.one_of(st.sampled_from([2**32 - 1, 2**63, 2**64 - 1, 2**31, 2**40]), st.integers(2**20, 2**64 - 1))


@SETTINGS
@given(field=st.sampled_from(sorted(FIELDS)), value=HUGE)
def test_oversized_gguf_fields_rejected(gguf_bytes, layout, field, value):
    fmt = FIELDS[field]
    value %= 1 << (8 * struct.calcsize(fmt))
    data = hostile.overwrite(gguf_bytes, layout[field], struct.pack(fmt, value))
    hostile.expect_rejected(f"gguf/oversized-{field}", lambda: _check(data))


@pytest.mark.parametrize("case", ["zero-dims", "five-dims", "zero-dim", "bad-type", "misaligned", "bad-magic",
                                  "version-1", "version-99", "empty", "tiny"])
def test_specific_gguf_corruptions(gguf_bytes, layout, case):
    o = layout
    data = {
        "zero-dims": lambda: hostile.overwrite(gguf_bytes, o["tensor_ndims"], struct.pack("<I", 0)),
        "five-dims": lambda: hostile.overwrite(gguf_bytes, o["tensor_ndims"], struct.pack("<I", 5)),
        "zero-dim": lambda: hostile.overwrite(gguf_bytes, o["tensor_dim0"], struct.pack("<Q", 0)),
        "bad-type": lambda: hostile.overwrite(gguf_bytes, o["tensor_type"], struct.pack("<I", 250)),
        "misaligned": lambda: hostile.overwrite(gguf_bytes, o["tensor_offset"], struct.pack("<Q", 3)),
        "bad-magic": lambda: b"GGUG" + gguf_bytes[4:],
        "version-1": lambda: hostile.overwrite(gguf_bytes, 4, struct.pack("<I", 1)),
        "version-99": lambda: hostile.overwrite(gguf_bytes, 4, struct.pack("<I", 99)),
        "empty": lambda: b"",
        "tiny": lambda: b"GGUF\x03\x00\x00\x00",
    }[case]()
    hostile.expect_rejected(f"gguf/{case}", lambda: _check(data))


# --- GGUF, through the CLI (bare files: no manifest hash to catch them) -----------------------------------------
CLI_GGUF = {
    "truncated-half": lambda b, o: b[: len(b) // 2],
    "huge-kv-count": lambda b, o: hostile.overwrite(b, o["n_kv"], struct.pack("<Q", 2**62)),
    "huge-key-len": lambda b, o: hostile.overwrite(b, o["first_key_len"], struct.pack("<Q", 2**40)),
    "huge-dim": lambda b, o: hostile.overwrite(b, o["tensor_dim0"], struct.pack("<Q", 2**50)),
    "bad-offset": lambda b, o: hostile.overwrite(b, o["tensor_offset"], struct.pack("<Q", 2**40)),
}


@pytest.mark.parametrize("case", sorted(CLI_GGUF))
def test_cli_inspect_hostile_gguf(gguf_bytes, layout, tmp_path, case):
    p = tmp_path / "bad.gguf"
    p.write_bytes(CLI_GGUF[case](gguf_bytes, layout))
    hostile.expect_cli_rejected(f"cli/inspect-gguf-{case}", "inspect", str(p))


@pytest.mark.parametrize("case", ["huge-dim", "bad-offset"])
def test_cli_generate_hostile_gguf(gguf_bytes, layout, tmp_path, case):
    """A bare .gguf goes to llama.cpp only after the Python bounds check: exit 2, not a native abort."""
    hostile.require_module("qwen_edge.runtime.generate")
    p = tmp_path / "bad.gguf"
    p.write_bytes(CLI_GGUF[case](gguf_bytes, layout))
    hostile.expect_cli_rejected(f"cli/generate-gguf-{case}", "generate", str(p), "--prompt", "hi",
                                "--max-new-tokens", "2")


def test_cli_generate_bitflipped_gguf_metadata_no_crash(gguf_bytes, layout, tmp_path):
    """Flips inside metadata values pass the structural check and reach llama.cpp: it must not kill the process."""
    import random

    hostile.require_module("qwen_edge.runtime.generate")
    rng = random.Random(8)
    for i in range(3):
        pos = [rng.randrange(layout["first_key_len"] * 8, layout["tensor_name_len"] * 8) for _ in range(2)]
        p = tmp_path / f"flip{i}.gguf"
        p.write_bytes(hostile.flip_bits(gguf_bytes, pos))
        r = hostile.run_cli("generate", str(p), "--prompt", "hi", "--max-new-tokens", "2")
        lines = r.stderr.strip().splitlines()
        clean = r.returncode in (0, 2) and "Traceback" not in r.stderr and (
            r.returncode == 0 or (bool(lines) and lines[-1].startswith("error: ")))
        assert hostile.record("cli/generate-gguf-metadata-flip", clean), \
            f"flip {pos}: exit {r.returncode}: {r.stderr[-1500:]}"


# --- ONNX -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_art(exported) -> Path:
    hostile.require_module("qwen_edge.export.onnx")
    return exported("tiny-qwen3", "onnx", "fp32")  # an export that raises fails the tests that need it


def _onnx_check(model: Path) -> None:
    from qwen_edge.formats.onnx import check_external_data, load_onnx_proto

    check_external_data(load_onnx_proto(model), model)


def _onnx_copy(src: Path, dst: Path, *, model: bytes | None = None, data: bytes | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.suffix in (".onnx", ".data"):
            (dst / p.name).write_bytes(p.read_bytes())
    m = dst / "model.onnx"
    if model is not None:
        m.write_bytes(model)
    if data is not None:
        (dst / "model.onnx_data").write_bytes(data)
    return m


@pytest.fixture(scope="module")
def onnx_data(onnx_art) -> bytes:
    return (onnx_art / "model.onnx_data").read_bytes()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(frac=st.floats(0.0, 0.999))
def test_truncated_onnx_data_rejected(onnx_art, onnx_data, frac):
    with hostile.scratch() as t:
        m = _onnx_copy(onnx_art, Path(t), data=onnx_data[: int(len(onnx_data) * frac)])
        hostile.expect_rejected("onnx/truncated-data", lambda: _onnx_check(m))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(frac=st.floats(0.0, 0.999), flips=st.lists(st.integers(0, 10**9), max_size=4))
def test_mutated_onnx_graph_clean(onnx_art, frac, flips):
    """A truncated or bit-flipped model.onnx: a clean rejection or a graph whose external data all checks out."""
    raw = (onnx_art / "model.onnx").read_bytes()
    mutated = hostile.flip_bits(raw, flips) if flips else hostile.truncate(raw, int(len(raw) * frac))
    with hostile.scratch() as t:
        m = _onnx_copy(onnx_art, Path(t), model=mutated)
        hostile.TRIED["onnx/mutated-graph"] += 1
        try:
            _onnx_check(m)
        except QwenEdgeError as e:
            assert str(e) and "\n" not in str(e)
        hostile.REJECTED["onnx/mutated-graph"] += 1


def _relocate(model_path: Path, key: str, value: str) -> None:
    import onnx

    m = onnx.load_model(str(model_path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == key:
                e.value = value
                break
        else:
            continue
        break
    model_path.write_bytes(m.SerializeToString())


@pytest.mark.parametrize("key,value", [("location", "../model.onnx_data"), ("location", "/etc/passwd"),
                                       ("location", "missing.data"), ("offset", "-8"), ("length", "99999999999"),
                                       ("offset", "99999999999"), ("length", "abc"), ("location", "")])
def test_onnx_external_data_lies_rejected(onnx_art, tmp_path, key, value):
    m = _onnx_copy(onnx_art, tmp_path)
    _relocate(m, key, value)
    hostile.expect_rejected(f"onnx/external-{key}", lambda: _onnx_check(m))


def test_cli_inspect_truncated_onnx(onnx_art, onnx_data, tmp_path):
    m = _onnx_copy(onnx_art, tmp_path, data=onnx_data[: len(onnx_data) // 3])
    hostile.expect_cli_rejected("cli/inspect-onnx-truncated", "inspect", str(m))
    m2 = _onnx_copy(onnx_art, tmp_path / "g", model=b"\x08\x07garbage" * 10)
    hostile.expect_cli_rejected("cli/inspect-onnx-garbage", "inspect", str(m2))
