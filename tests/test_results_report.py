"""benchmarks/RESULTS.md and the counts in docs/reliability.md are rendered from committed records (issue 14.5).

A hand edit to a rendered file, or a figure changed in a record without re-rendering, fails `report.py --check`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


@pytest.fixture(scope="module")
def report():
    return _module("report")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of what report.py reads and writes: the records, RESULTS.md (+ plots it links), docs/reliability.md."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copytree(BENCH / "results", tmp_path / "benchmarks" / "results")
    for p in BENCH.glob("*.png"):
        shutil.copy(p, tmp_path / "benchmarks" / p.name)
    shutil.copy(BENCH / "RESULTS.md", tmp_path / "benchmarks" / "RESULTS.md")
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "reliability.md", tmp_path / "docs" / "reliability.md")
    return tmp_path


def test_committed_results_match_their_records():
    r = subprocess.run([sys.executable, str(BENCH / "report.py"), "--check"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


def test_copy_of_the_tree_checks_clean(report, tree):
    assert report.main(["--check", "--root", str(tree)]) == 0


def _edit_first_figure(text: str) -> tuple[str, str]:
    """Change one digit of the first table row that holds a number with a decimal point."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        m = re.search(r"\| (\d+)\.(\d)", line) if line.startswith("| ") and "---" not in line else None
        if m:
            digit = m.group(2)
            new = str((int(digit) + 1) % 10)
            lines[i] = line[:m.start(2)] + new + line[m.end(2):]
            return "".join(lines), line.strip()
    raise AssertionError("no figure found in a table")


def test_hand_edited_results_figure_fails_check(report, tree, capsys):
    p = tree / "benchmarks" / "RESULTS.md"
    edited, _ = _edit_first_figure(p.read_text())
    p.write_text(edited)
    assert report.main(["--check", "--root", str(tree)]) == 1
    err = capsys.readouterr().err
    assert "stale: benchmarks/RESULTS.md line" in err, err
    # rendering restores it, and the check passes again
    assert report.main(["--root", str(tree)]) == 0
    assert report.main(["--check", "--root", str(tree)]) == 0
    assert p.read_text() == (BENCH / "RESULTS.md").read_text()


def test_figure_changed_in_a_record_fails_check(report, tree):
    rec = sorted((tree / "benchmarks" / "results").glob("suite-*.json"))[0]
    doc = json.loads(rec.read_text())
    row = doc["figures"]["reports"][0]["results"][0]
    row["decode_tokens_per_s"]["median"] += 1.0
    rec.write_text(json.dumps(doc, indent=1) + "\n")
    assert report.main(["--check", "--root", str(tree)]) == 1


def test_a_removed_record_takes_its_rows_with_it(report, tree):
    rec = sorted((tree / "benchmarks" / "results").glob("busy-*.json"))[0]
    rec.unlink()
    assert report.main(["--check", "--root", str(tree)]) == 1
    report.main(["--root", str(tree)])
    assert rec.name not in (tree / "benchmarks" / "RESULTS.md").read_text()


def test_hand_edited_reliability_count_fails_check(report, tree):
    assert list((tree / "benchmarks" / "results").glob("reliability-*.json")), "no reliability record committed"
    p = tree / "docs" / "reliability.md"
    text = p.read_text()
    m = re.search(r"\*\*(\d+) hostile inputs tried, (\d+) rejected cleanly\*\*", text)
    assert m, "the generated count line is missing from docs/reliability.md"
    p.write_text(text.replace(m.group(0), f"**{int(m.group(1)) + 1} hostile inputs tried, {m.group(2)} rejected "
                                           f"cleanly**"))
    assert report.main(["--check", "--root", str(tree)]) == 1
    report.main(["--root", str(tree)])
    assert p.read_text() == text


def test_reliability_counts_come_from_the_newest_record(report, tree):
    recs = sorted((tree / "benchmarks" / "results").glob("reliability-*.json"))
    doc = json.loads(recs[-1].read_text())
    doc["date"] = "2999-01-01T00:00:00Z"
    doc["figures"]["tried"] += 5
    (tree / "benchmarks" / "results" / "reliability-29990101T000000Z.json").write_text(json.dumps(doc))
    assert report.main(["--check", "--root", str(tree)]) == 1
    report.main(["--root", str(tree)])
    assert f"**{doc['figures']['tried']} hostile inputs tried" in (tree / "docs" / "reliability.md").read_text()


def test_unknown_bench_is_rendered_not_dropped(report, tree):
    rec = {"format": "qwen-edge-record/1", "bench": "mystery", "command": "python x.py", "date": "2030-01-01T00:00:00Z",
           "machine": {}, "libraries": {}, "settings": {}, "figures": {"speed": {"tok_s": 12.345}}}
    (tree / "benchmarks" / "results" / "mystery-20300101T000000Z.json").write_text(json.dumps(rec))
    report.main(["--root", str(tree)])
    text = (tree / "benchmarks" / "RESULTS.md").read_text()
    assert "| speed.tok_s | 12.345 |" in text


def test_write_record_keeps_run_metadata(tmp_path):
    rec_mod = _module("_record")
    path = rec_mod.write_record("unit", {"x": 1.5}, settings={"n": 2}, notes=["a note"], out_dir=tmp_path,
                                argv=["benchmarks/unit.py", "--flag", "a b"])
    assert re.fullmatch(r"unit-\d{8}T\d{6}Z\.json", path.name)
    doc = json.loads(path.read_text())
    assert doc["format"] == "qwen-edge-record/1" and doc["bench"] == "unit"
    assert doc["command"] == "python benchmarks/unit.py --flag 'a b'"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["date"])
    m = doc["machine"]
    assert m["logical_cores"] and m["memory_bytes"] and m["python"] and m["cpu"]
    assert isinstance(m["flags"], str) and m["load_average_start"] is not None
    assert doc["libraries"]["numpy"] and "qwen_edge" in doc["libraries"] and "git_commit" in doc["libraries"]
    assert doc["figures"] == {"x": 1.5} and doc["settings"] == {"n": 2} and doc["notes"] == ["a note"]


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")
                                          if p.name.startswith(("bench_", "run_"))))
def test_every_benchmark_script_writes_a_record(script):
    assert "write_record(" in (BENCH / script).read_text(), f"{script} measures without writing a record"


def test_every_renderer_has_the_one_section_shape():
    """A bench's section is written by report.section (title and intro, an optional table over the records, then
    each record's header and body): no renderer writes the record headers itself."""
    src = (BENCH / "report.py").read_text(encoding="utf-8")
    assert len(re.findall(r"\bheader\(r\)", src)) == 1, "a renderer writes record headers outside section()"
    renderers = re.findall(r"^def (render_\w+)\(recs: list\[Record\], root: Path\)", src, flags=re.M)
    bodies = re.split(r"^def ", src, flags=re.M)
    for name in renderers:
        body = next(b for b in bodies if b.startswith(name + "("))
        assert "return section(" in body or "= section(" in body, f"{name} does not use section()"
