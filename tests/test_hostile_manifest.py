"""Hostile manifests: corrupt JSON, wrong types, paths and symlinks leaving the artifact, hash and size lies."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile
from qwen_edge.model.artifact import Artifact, safe_relpath
from qwen_edge.model.checkpoint import sha256_file
from qwen_edge.errors import QwenEdgeError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def art(exported) -> Path:
    return exported("tiny-qwen3", "gguf", "f16")


def clone(src: Path, dst: Path) -> Path:
    """Copy an artifact cheaply: hard links for every file (replace a file with `put`, never write in place)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        os.link(p, dst / p.name)
    return dst


def put(path: Path, data: bytes | str) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def manifest_of(d: Path) -> dict[str, Any]:
    return json.loads((d / "manifest.json").read_text())


def with_manifest(src: Path, dst: Path, edit: Callable[[dict], Any]) -> Path:
    d = clone(src, dst)
    m = manifest_of(d)
    out = edit(m)
    put(d / "manifest.json", out if isinstance(out, (str, bytes)) else json.dumps(m))
    return d


def test_valid_artifact_opens(art):
    a = Artifact.open(art)
    assert a.model_file.is_file() and a.format == "gguf"


# --- corrupt manifest bytes -----------------------------------------------------------------------------------
@SETTINGS
@given(frac=st.floats(0.0, 1.0))
def test_truncated_manifest_rejected(art, frac):
    raw = (art / "manifest.json").read_bytes().rstrip()
    with tempfile.TemporaryDirectory() as t:
        d = clone(art, Path(t) / "a")
        put(d / "manifest.json", raw[: int((len(raw) - 1) * frac)])
        hostile.expect_rejected("manifest/truncated", lambda: Artifact.open(d))


@SETTINGS
@given(positions=st.lists(st.integers(0, 10**9), min_size=1, max_size=6))
def test_bitflipped_manifest_clean(art, positions):
    """A flipped manifest either fails cleanly or still describes files that all verify."""
    raw = (art / "manifest.json").read_bytes()
    with tempfile.TemporaryDirectory() as t:
        d = clone(art, Path(t) / "a")
        put(d / "manifest.json", hostile.flip_bits(raw, positions))
        hostile.TRIED["manifest/bitflip"] += 1
        try:
            a = Artifact.open(d)
            assert a.model_file.is_file()
            _ = a.stop_ids, a.context_length
        except QwenEdgeError as e:
            assert str(e) and "\n" not in str(e)
        hostile.REJECTED["manifest/bitflip"] += 1


# --- values of the wrong type or range ------------------------------------------------------------------------
def _set(key: str, value: Any) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m[key] = value
    return edit


def _tok(value: Any) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["tokenizer"]["stop_ids"] = value
    return edit


def _files(fn: Callable[[list], None]) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        fn(m["files"])
    return edit


def _entry(name: str, key: str, value: Any) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        for e in m["files"]:
            if e["path"] == name:
                e[key] = value
    return edit


TYPE_CASES: dict[str, Callable[[dict], Any]] = {
    "format-list": _set("format", ["gguf"]),
    "format-dict": _set("format", {"a": 1}),
    "model-file-list": _set("model_file", ["model.gguf"]),
    "model-file-null": _set("model_file", None),
    "model-file-unlisted": _set("model_file", "tokenizer_config.jsonx"),
    "files-dict": _set("files", {"path": "model.gguf"}),
    "files-entry-string": _files(lambda f: f.append("model.gguf")),
    "files-entry-missing-key": _files(lambda f: f.append({"path": "x"})),
    "bytes-string": _entry("model.gguf", "bytes", "25580448"),
    "bytes-float": _entry("model.gguf", "bytes", 1.5),
    "sha-null": _entry("model.gguf", "sha256", None),
    "architecture-list": _set("architecture", []),
    "schema-2": _set("schema_version", 2),
    "schema-string": _set("schema_version", "1"),
    "context-string": _set("context_length", "4096"),
    "context-negative": _set("context_length", -1),
    "context-huge": _set("context_length", 10**30),
    "context-bool": _set("context_length", True),
    "tokenizer-list": _set("tokenizer", []),
    "stop-ids-strings": _tok(["<|im_end|>"]),
    "stop-ids-negative": _tok([-1]),
    "stop-ids-huge": _tok([2**62]),
    "stop-ids-dict": _tok({"a": 1}),
    "nan-context": lambda m: json.dumps(m).replace('"context_length": 4096', '"context_length": NaN'),
    "infinity": lambda m: json.dumps({**m, "x": 1}).replace('"x": 1', '"x": -Infinity'),
    "deep-json": lambda m: hostile.deep_json(200_000),
    "huge-manifest": lambda m: json.dumps({**m, "pad": "x" * (17 * 1024 * 1024)}),
    "not-object": lambda m: "[]",
    "invalid-utf8": lambda m: json.dumps(m).encode() + b"\xff",
    "empty": lambda m: "",
    "missing-files": lambda m: json.dumps({k: v for k, v in m.items() if k != "files"}),
    "missing-format": lambda m: json.dumps({k: v for k, v in m.items() if k != "format"}),
}


@pytest.mark.parametrize("case", sorted(TYPE_CASES))
def test_hostile_manifest_values(art, tmp_path, case):
    d = with_manifest(art, tmp_path / "a", TYPE_CASES[case])
    hostile.expect_rejected(f"manifest/{case}", lambda: Artifact.open(d))


# --- paths: nothing outside the artifact directory ------------------------------------------------------------
PATH_VALUES = {
    "dotdot": "../model.gguf",
    "dotdot-deep": "a/../../../etc/passwd",
    "absolute": "/etc/passwd",
    "backslash-abs": "\\etc\\passwd",
    "drive": "C:/Windows/win.ini",
    "nul": "model.gguf\u0000.txt",
    "empty": "",
    "long": "a/" * 3000 + "model.gguf",
    "dot": ".",
    "int": 7,
    "list": ["model.gguf"],
}


@pytest.mark.parametrize("case", sorted(PATH_VALUES))
def test_files_path_outside_rejected(art, tmp_path, case):
    value = PATH_VALUES[case]
    d = with_manifest(art, tmp_path / "a", _files(lambda f: f.append({"path": value, "bytes": 1, "sha256": "0" * 64})))
    hostile.expect_rejected(f"paths/files-{case}", lambda: Artifact.open(d))


@pytest.mark.parametrize("case", sorted(k for k in PATH_VALUES if isinstance(PATH_VALUES[k], str)))
def test_model_file_outside_rejected(art, tmp_path, case):
    d = with_manifest(art, tmp_path / "a", _set("model_file", PATH_VALUES[case]))
    hostile.expect_rejected(f"paths/model-file-{case}", lambda: Artifact.open(d))


def _outside_copy(art: Path, tmp: Path, name: str) -> Path:
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    os.link(art / name, outside / name)
    return outside / name


def test_symlinked_model_file_rejected(art, tmp_path):
    """A symlink to a file outside, even one with the right size and hash, is refused."""
    d = clone(art, tmp_path / "a")
    target = _outside_copy(art, tmp_path, "model.gguf")
    (d / "model.gguf").unlink()
    (d / "model.gguf").symlink_to(target)
    hostile.expect_rejected("paths/symlink-file", lambda: Artifact.open(d), match="symlink")


def test_symlinked_directory_rejected(art, tmp_path):
    outside = _outside_copy(art, tmp_path, "model.gguf").parent
    d = with_manifest(art, tmp_path / "a", lambda m: [
        m.__setitem__("model_file", "sub/model.gguf"),
        m["files"].append({"path": "sub/model.gguf", "bytes": (art / "model.gguf").stat().st_size,
                           "sha256": sha256_file(art / "model.gguf")})])
    (d / "sub").symlink_to(outside, target_is_directory=True)
    hostile.expect_rejected("paths/symlink-dir", lambda: Artifact.open(d), match="outside")


def test_symlinked_manifest_rejected(art, tmp_path):
    d = clone(art, tmp_path / "a")
    target = _outside_copy(art, tmp_path, "manifest.json")
    (d / "manifest.json").unlink()
    (d / "manifest.json").symlink_to(target)
    hostile.expect_rejected("paths/symlink-manifest", lambda: Artifact.open(d), match="symlink")


def test_symlink_loop_rejected(art, tmp_path):
    d = with_manifest(art, tmp_path / "a", _files(lambda f: f.append({"path": "loop/x", "bytes": 1, "sha256": "0"})))
    (d / "loop").symlink_to(d / "loop")
    hostile.expect_rejected("paths/symlink-loop", lambda: Artifact.open(d))


def test_safe_relpath_unit(tmp_path):
    assert safe_relpath(tmp_path, "a/b.txt") == tmp_path / "a" / "b.txt"
    for bad in ("../x", "/x", "a/../../x", "", "x\0y", "C:x"):
        hostile.expect_rejected("paths/safe_relpath", lambda: safe_relpath(tmp_path, bad))


# --- contents that lie ----------------------------------------------------------------------------------------
def test_altered_model_rejected_by_hash(art, tmp_path):
    d = clone(art, tmp_path / "a")
    data = bytearray((art / "model.gguf").read_bytes())
    data[len(data) // 2] ^= 0x40
    put(d / "model.gguf", bytes(data))
    hostile.expect_rejected("manifest/sha256-mismatch", lambda: Artifact.open(d), match="sha256")


def test_truncated_model_rejected_by_size(art, tmp_path):
    d = clone(art, tmp_path / "a")
    put(d / "model.gguf", (art / "model.gguf").read_bytes()[:1000])
    hostile.expect_rejected("manifest/size-mismatch", lambda: Artifact.open(d), match="bytes")


def test_missing_listed_file_rejected(art, tmp_path):
    d = clone(art, tmp_path / "a")
    (d / "tokenizer.json").unlink()
    hostile.expect_rejected("manifest/missing-file", lambda: Artifact.open(d), match="missing")


def test_unlisted_template_rejected(art, tmp_path):
    """Dropping a file from the manifest does not let a swapped chat template or tokenizer in."""
    d = with_manifest(art, tmp_path / "a",
                      _files(lambda f: f.remove(next(e for e in f if e["path"] == "chat_template.jinja"))))
    put(d / "chat_template.jinja", "{{ cycler.__init__.__globals__ }}")
    hostile.expect_rejected("manifest/unlisted-template", lambda: Artifact.open(d), match="not listed")


def test_load_refuses_swapped_or_truncated_model(art, exported, tmp_path):
    """load() hashes nothing by default, yet a swapped-in or truncated model file still fails on its size, in Python,
    before the native engine opens it (a same-size change is `load(check_hashes=True)`'s and `inspect`'s to find)."""
    from qwen_edge.backends import load

    other = exported("tiny-qwen3", "gguf", "q8_0") / "model.gguf"
    d = clone(art, tmp_path / "swapped")
    put(d / "model.gguf", other.read_bytes())
    hostile.expect_rejected("load/swapped-model", lambda: load(d, max_context=32), match="manifest says")
    d = clone(art, tmp_path / "truncated")
    put(d / "model.gguf", (art / "model.gguf").read_bytes()[:-1])
    hostile.expect_rejected("load/truncated-model", lambda: load(d, max_context=32), match="manifest says")
    hostile.expect_cli_rejected("cli/generate-truncated-model", "generate", str(d), "--prompt", "hi",
                                "--max-new-tokens", "1", match="manifest says")


def test_not_an_artifact(tmp_path):
    hostile.expect_rejected("manifest/no-dir", lambda: Artifact.open(tmp_path / "nope"))
    hostile.expect_rejected("manifest/no-manifest", lambda: Artifact.open(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").mkdir()
    hostile.expect_rejected("manifest/manifest-is-dir", lambda: Artifact.open(tmp_path / "m"))


# --- the CLI on a sample of the above ---------------------------------------------------------------------------
CLI_CASES = ["deep-json", "format-list", "model-file-list", "nan-context", "stop-ids-strings", "context-string",
             "invalid-utf8", "bytes-string"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_inspect_hostile_manifest(art, tmp_path, case):
    hostile.require_module("qwen_edge.cli.inspect")
    d = with_manifest(art, tmp_path / "a", TYPE_CASES[case])
    hostile.expect_cli_rejected(f"cli/inspect-manifest-{case}", "inspect", str(d))


@pytest.mark.parametrize("case", ["dotdot", "absolute", "nul"])
def test_cli_inspect_outside_path(art, tmp_path, case):
    hostile.require_module("qwen_edge.cli.inspect")
    d = with_manifest(art, tmp_path / "a", _set("model_file", PATH_VALUES[case]))
    hostile.expect_cli_rejected(f"cli/inspect-path-{case}", "inspect", str(d), "--json")
