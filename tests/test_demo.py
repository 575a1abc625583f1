"""`qwen-edge demo --quick` end to end in a subprocess, and its reuse of earlier outputs."""

from __future__ import annotations

import io
import re

from qwen_edge.cli.demo import Progress


def test_demo_quick_end_to_end(cli, tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", "--quick", "-o", str(out), timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    text = r.stdout
    assert "GGUF q4_k_m" in text and "ONNX int4" in text
    assert "llama_cpp" in text and "onnxruntime" in text  # both backends ran the turn
    assert "prompt ids identical on both backends: yes" in text
    ids = re.findall(r"prompt ids: (\[.*\])", text)
    assert len(ids) == 2 and ids[0] == ids[1]
    assert "meaningless" in text and "bytes are read per" in text  # the honest note about synthesized weights
    assert "decode tok/s" in text
    total = int(re.search(r"\[1/(\d+)\]", r.stderr).group(1))
    assert total >= 7
    for step in range(1, total + 1):
        assert f"[{step}/{total}]" in r.stderr and f"[{step}/{total}] " in r.stderr
    assert (out / "artifacts" / "gguf-q4_k_m" / "manifest.json").is_file()
    assert (out / "artifacts" / "onnx-int4" / "manifest.json").is_file()
    again = cli("demo", "--quick", "-o", str(out), timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reused (same inputs)") == 2


def test_progress_lines_without_a_terminal():
    buf = io.StringIO()
    p = Progress(total=2, stream=buf)
    with p.step("first") as note:
        note["text"] = "ok"
    try:
        with p.step("second"):
            raise ValueError("boom")
    except ValueError:
        pass
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[1/2] first …"
    assert lines[1].startswith("[1/2] first: done in ") and lines[1].endswith("— ok")
    assert lines[3].startswith("[2/2] second: failed after")
