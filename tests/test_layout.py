"""The package layout holds: backends/ and export/ never import each other, only formats/gguf.py touches gguf-py's
GGUFReader/GGUFWriter, no family is named outside families/, and library modules never see argparse."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "qwen_edge"


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = ".".join(("qwen_edge",) + path.relative_to(PKG).parent.parts)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("folder,forbidden", [("backends", "qwen_edge.export"), ("export", "qwen_edge.backends")])
def test_backends_and_export_do_not_import_each_other(folder, forbidden):
    for f in sorted((PKG / folder).rglob("*.py")):
        bad = sorted(m for m in _imports(f) if m == forbidden or m.startswith(forbidden + "."))
        assert not bad, f"{f.relative_to(PKG)} imports {bad}"


def test_only_formats_gguf_touches_the_gguf_reader_and_writer():
    for f in sorted(PKG.rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        if f != PKG / "formats" / "gguf.py":
            assert "GGUFWriter" not in text and "GGUFReader" not in text, f.relative_to(PKG)
    assert "_pack_val" not in (PKG / "formats" / "gguf.py").read_text(encoding="utf-8")


def test_library_modules_never_see_argparse():
    for f in sorted(PKG.rglob("*.py")):
        if "cli" in f.relative_to(PKG).parts:
            continue
        assert "argparse" not in _imports(f), f.relative_to(PKG)
        assert not re.search(r"\bargs\.[a-z]", f.read_text(encoding="utf-8")), \
            f"{f.relative_to(PKG)} reads an argparse namespace"


def test_no_family_named_outside_families():
    for f in sorted(PKG.rglob("*.py")):
        if "families" in f.relative_to(PKG).parts:
            continue
        text = f.read_text(encoding="utf-8")
        for name in ('"qwen3"', "'qwen3'", '== "qwen2"', "Qwen3ForCausalLM", "Qwen2ForCausalLM"):
            assert name not in text, f"{f.relative_to(PKG)} names a family ({name})"


def test_only_serve_imports_the_web_stack():
    """starlette and uvicorn are the optional [serve] extra: one module imports them, lazily for the CLI."""
    for f in sorted(PKG.rglob("*.py")):
        web = sorted(m for m in _imports(f) if m.split(".")[0] in ("starlette", "uvicorn", "fastapi"))
        if f != PKG / "serve.py":
            assert not web, f"{f.relative_to(PKG)} imports {web}"
