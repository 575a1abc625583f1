"""The package layout holds: the package root holds only the modules docs/architecture.md justifies, every other
module lives in a room, rooms import only rooms below them in ROOMS, no two files import each other in a circle, the
old root module paths still import; backends/ and export/ never import each other, only formats/gguf.py touches
gguf-py's GGUFReader/GGUFWriter, no family is named outside families/, and library modules never see argparse."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "qwen_edge"
ARCHITECTURE = PKG.parent / "docs" / "architecture.md"

ROOT_MODULES = {"__init__", "errors", "log", "supervisor"}
"""What may sit in the package root (docs/architecture.md says why each one is there)."""
ROOMS = [  # bottom to top: a room imports only rooms on lines above it; rooms on one line never import each other
    ("errors",),
    ("log",),
    ("families", "formats", "device"),
    ("text",),
    ("model",),
    ("backends", "export"),
    ("runtime", "quality"),
    ("bench", "recipes", "serve"),
    ("cli",),
    ("supervisor",),
]
RANK = {room: i for i, line in enumerate(ROOMS) for room in line}


def _imports(path: Path, root: Path = PKG) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = ".".join(("qwen_edge",) + path.relative_to(root).parent.parts)
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
    """starlette and uvicorn are the optional [serve] extra: only serve/app.py (the routes) and serve/server.py (the
    uvicorn process) import them, lazily for the CLI; the protocol and the engine are plain Python."""
    for f in sorted(PKG.rglob("*.py")):
        web = sorted(m for m in _imports(f) if m.split(".")[0] in ("starlette", "uvicorn", "fastapi"))
        if f not in (PKG / "serve" / "app.py", PKG / "serve" / "server.py"):
            assert not web, f"{f.relative_to(PKG)} imports {web}"


# --- rooms and the import graph ---------------------------------------------------------------------------------
def _module_name(path: Path, root: Path = PKG) -> str:
    parts = ("qwen_edge",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at run time, lazily inside a function, or for type checkers). An
    import of a name resolves to the module that defines it; importing the package root itself (its version, the
    old-path helper) is no edge."""
    files = {_module_name(f, pkg): f for f in sorted(pkg.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        out = set()
        for m in _imports(f, pkg):
            while m not in files and "." in m:
                m = m.rsplit(".", 1)[0]
            if m in files and m not in (name, "qwen_edge"):
                out.add(m)
        graph[name] = out
    return graph


def _room(module: str) -> str:
    return module.split(".")[1]


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_package_root_holds_only_what_the_architecture_justifies():
    root = {f.stem for f in PKG.glob("*.py")}
    assert root <= ROOT_MODULES, f"modules in the package root that belong in a room: {sorted(root - ROOT_MODULES)}"
    section = ARCHITECTURE.read_text(encoding="utf-8").split("## The package root", 1)[1].split("\n## ", 1)[0]
    for stem in sorted(root - {"__init__"}):
        assert f"`{stem}.py`" in section, f"docs/architecture.md does not say why {stem}.py is in the package root"


def test_every_room_has_a_place_in_the_order():
    rooms = {d.name for d in PKG.iterdir() if (d / "__init__.py").is_file()}
    assert rooms <= set(RANK), f"rooms missing from ROOMS: {sorted(rooms - set(RANK))}"
    drawn = ARCHITECTURE.read_text(encoding="utf-8").split("```", 2)[1]  # the drawing of the rooms
    for room in rooms:
        assert re.search(rf"(?m)^  {room}/ ", drawn), f"docs/architecture.md does not show {room}/"


def test_rooms_import_only_rooms_below_them():
    graph = _graph()
    bad = sorted(f"{a} -> {b}" for a, deps in graph.items() if a != "qwen_edge" for b in deps
                 if _room(a) != _room(b) and RANK[_room(b)] >= RANK[_room(a)])
    assert not bad, "imports up or sideways in ROOMS:\n" + "\n".join(bad)


def test_no_import_circle_between_files():
    assert _circles(_graph()) == []


def test_the_graph_sees_lazy_and_type_checking_imports(tmp_path):
    """The two rules above read every import: at module level, inside a function, under TYPE_CHECKING."""
    pkg = tmp_path / "qwen_edge"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from .y import g\n")
    (pkg / "a" / "y.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import x\n")
    assert _circles(_graph(pkg)) == [["qwen_edge.a.x", "qwen_edge.a.y"]]


OLD_PATHS = """
import sys, types, importlib
import qwen_edge
loaded = sorted(m for m in sys.modules if m.startswith("qwen_edge"))
assert loaded == ["qwen_edge", "qwen_edge.errors"], loaded  # the old-path finder imports nothing up front
from qwen_edge import _MOVED
for old, new in _MOVED.items():
    mod = importlib.import_module("qwen_edge." + old)
    if len(new) == 1:
        assert mod is importlib.import_module("qwen_edge." + new[0]), old
import qwen_edge.tokenizer, qwen_edge.verify, qwen_edge.generate, qwen_edge.bench
assert qwen_edge.tokenizer.Tokenizer is qwen_edge.Tokenizer
for n in ("export", "verify", "bench", "generate"):
    assert callable(getattr(qwen_edge, n)) and not isinstance(getattr(qwen_edge, n), types.ModuleType), n
from qwen_edge.generate import generate, model_meta, read_json, read_messages
from qwen_edge.verify_device import ReferenceRecorder, verify_on_device
from qwen_edge.recipe import load_recipe, run_export
from qwen_edge.bench import bench, check_budgets, markdown_table
from qwen_edge.serve import ApiError, Engine, Limits, create_app, parse_chat_request, serve
from qwen_edge.tools import ToolCall, check_messages
assert qwen_edge.ToolCall is ToolCall
try:
    import qwen_edge.no_such_module
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("an unknown name imported")
"""


def test_old_module_paths_still_import():
    """`qwen_edge.tokenizer`, `qwen_edge.verify`, ... (the modules that sat in the package root) import as before:
    the moved module itself, or for a split one its old names; `import qwen_edge` stays as light as it was."""
    res = subprocess.run([sys.executable, "-c", OLD_PATHS], capture_output=True, text=True, timeout=300,
                         cwd=PKG.parent)
    assert res.returncode == 0, res.stderr[-3000:]


def test_one_marker_hold_back():
    """Text that may start a marker (a stop string, </think>, <tool_call>) is held back by text/streaming.held_back
    alone: no other module tests a stream's end against a marker's prefixes."""
    idiom = re.compile(r"\.endswith\(\s*[\w.]+\[\s*:\s*\w+\s*\]\s*\)")
    found = sorted(str(f.relative_to(PKG)) for f in PKG.rglob("*.py") if idiom.search(f.read_text(encoding="utf-8")))
    assert found == ["text/streaming.py"], found
