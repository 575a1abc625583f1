"""Run the hostile-input suite and record its counts (benchmarks/results/reliability-*.json) for docs/reliability.md.

    python benchmarks/run_reliability.py          # runs the pytest command below, writes the record
    python benchmarks/report.py                   # renders the counts block of docs/reliability.md from it

The counts are the ones tests/hostile.py writes at the end of the run (`hostile.record` / `rejects_cleanly`, via
QWEN_EDGE_HOSTILE_COUNTS); the test totals come from pytest's JUnit XML of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _record import start, write_record  # noqa: E402

MODULES = ["tests/test_hostile_*.py", "tests/test_interrupt.py", "tests/test_soak.py"]


def junit_totals(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    t = Counter()
    skipped = Counter()
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            t[k] += int(s.get(k, 0))
        t["seconds"] += float(s.get("time", 0))
        for case in s.iter("testcase"):
            sk = case.find("skipped")
            if sk is not None:
                if sk.get("type") == "pytest.xfail":
                    t["xfailed"] += 1
                else:
                    skipped[(sk.get("message") or "").strip()[:120]] += 1
    xfailed = t["xfailed"]
    skips = t["skipped"] - xfailed
    return {"tests": t["tests"], "passed": t["tests"] - t["failures"] - t["errors"] - t["skipped"],
            "failed": t["failures"], "errors": t["errors"], "skipped": skips, "xfailed": xfailed,
            "seconds": round(t["seconds"], 1), "skipped_reasons": dict(skipped)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pytest-args", default="", help="extra arguments for pytest (e.g. '-x')")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the record goes (default benchmarks/results)")
    a = ap.parse_args(argv)
    import glob

    files = sorted(f for pat in MODULES for f in glob.glob(str(ROOT / pat)))
    rel = [str(Path(f).relative_to(ROOT)) for f in files]
    with tempfile.TemporaryDirectory(prefix="qwen-edge-reliability-") as tmp:
        counts, junit = Path(tmp) / "hostile_counts.json", Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *rel,
               *a.pytest_args.split()]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "QWEN_EDGE_HOSTILE_COUNTS": str(counts)}
        start()
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env)
        wall = time.perf_counter() - t
        if not counts.is_file() or not junit.is_file():
            raise SystemExit(f"pytest (exit {r.returncode}) wrote no counts or no JUnit XML: nothing recorded")
        doc = json.loads(counts.read_text())
        tests = junit_totals(junit)
    tests["wall_seconds"] = round(wall, 1)
    tests["exit_code"] = r.returncode
    write_record("reliability", {**doc, "tests": tests},
                 settings={"pytest": "PYTHONPATH=. pytest " + " ".join(MODULES) + (f" {a.pytest_args}"
                                                                                    if a.pytest_args else ""),
                           "modules": rel},
                 notes=a.note, out_dir=a.out_dir, rendered_in="docs/reliability.md",
                 argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
