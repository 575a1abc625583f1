"""The public API as an app sees it: names at the package root, their static types, and docs/api.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_api_functions_survive_importing_their_submodules():
    # qwen_edge.export is both a function and a package; importing the package must not shadow the function.
    code = ("import qwen_edge, qwen_edge.export.gguf, qwen_edge.quality.verify, qwen_edge.bench.run, qwen_edge.runtime.generate\n"
            "import importlib, types\n"
            "for n in ('export', 'verify', 'bench', 'generate', 'load'):\n"
            "    f = getattr(qwen_edge, n)\n"
            "    assert callable(f) and not isinstance(f, types.ModuleType), (n, f)\n"
            "assert isinstance(importlib.import_module('qwen_edge.export'), types.ModuleType)\n"
            "import sys\n"
            "assert not {'onnxruntime', 'llama_cpp', 'torch'} & set(sys.modules), 'import qwen_edge must stay light'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_every_public_name_resolves():
    import qwen_edge

    for name in qwen_edge.__all__:
        assert getattr(qwen_edge, name) is not None, name
    with pytest.raises(AttributeError):
        qwen_edge.no_such_name  # noqa: B018


def _mypy(*files: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental",
                           "--python-version", "3.11", *map(str, files)],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def test_public_api_types_and_documented_examples_type_check(tmp_path):
    """mypy --strict on an app using the API (assert_type pins each type, so an `Any` fails) and on every
    example of docs/api.md, against the package's own annotations (it ships py.typed)."""
    pytest.importorskip("mypy")
    assert (ROOT / "qwen_edge" / "py.typed").is_file()
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 3
    files = [ROOT / "tests" / "data" / "api_types.py"]
    for i, block in enumerate(blocks, 1):
        files.append(tmp_path / f"api_example_{i}.py")
        files[-1].write_text(block, encoding="utf-8")
    res = _mypy(*files, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_type_check_catches_a_wrong_type(tmp_path):
    """The check above can fail: a wrong use of the API is a mypy error."""
    pytest.importorskip("mypy")
    bad = tmp_path / "bad.py"
    bad.write_text("import qwen_edge\nrt = qwen_edge.load('x')\nn: str = rt.info.context_length\n"
                   "qwen_edge.generate(rt, 'not ids', max_new_tokens='8')\n", encoding="utf-8")
    res = _mypy(bad, cwd=ROOT)
    assert res.returncode == 1
    assert 'Incompatible types in assignment (expression has type "int", variable has type "str")' in res.stdout
    assert 'Argument "max_new_tokens" to "generate" has incompatible type "str"' in res.stdout


def test_export_keeps_an_up_to_date_artifact_and_its_parity_record(synth_ckpt, tmp_path, caplog):
    """qwen_edge.export() skips an intact artifact built from the same source and settings, as the CLI does."""
    import logging

    import qwen_edge
    from qwen_edge.model.artifact import Artifact

    ck = synth_ckpt("tiny-qwen2")
    art = qwen_edge.export(ck, "gguf", "q8_0", tmp_path, name="m")
    Artifact.open(art).update_manifest(parity={"passed": True, "note": "recorded by an earlier verify"})
    inode = (art / "model.gguf").stat().st_ino
    with caplog.at_level(logging.INFO, logger="qwen_edge"):
        again = qwen_edge.export(ck, "gguf", "q8_0", tmp_path, name="m")
    assert again == art and (art / "model.gguf").stat().st_ino == inode
    assert Artifact.open(art).manifest["parity"]["passed"] is True
    assert "up to date, export skipped" in caplog.text

    qwen_edge.export(ck, "gguf", "q8_0", tmp_path, name="m", options={"threads": 1})  # how fast, not what
    assert (art / "model.gguf").stat().st_ino == inode
    qwen_edge.export(ck, "gguf", "q8_0", tmp_path, name="m", context_length=128)  # another setting: rebuilt
    assert (art / "model.gguf").stat().st_ino != inode
    assert Artifact.open(art).manifest["parity"] is None and Artifact.open(art).context_length == 128
    inode = (art / "model.gguf").stat().st_ino
    qwen_edge.export(ck, "gguf", "q8_0", tmp_path, name="m", context_length=128, force=True)
    assert (art / "model.gguf").stat().st_ino != inode
