"""Full-size runs on the synthesized Qwen2.5-0.5B and Qwen3-0.6B (marked slow: `pytest -m slow`)."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_edge.artifact import Artifact
from qwen_edge.backends import load
from qwen_edge.export import export
from qwen_edge.export.gguf import QUANTS as GGUF_QUANTS
from qwen_edge.synth import synth

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt_05b(tmp_path_factory):
    return synth("qwen2.5-0.5b", tmp_path_factory.mktemp("full") / "qwen2.5-0.5b")


@pytest.mark.parametrize("quant", GGUF_QUANTS)
def test_every_gguf_quant_of_05b_loads_and_generates(ckpt_05b, tmp_path, quant):
    art = export(ckpt_05b, "gguf", quant, tmp_path, name=f"q05-{quant}")
    q = Artifact.open(art).manifest["quantization"]
    assert q["requested"] == quant and q["bits_per_weight"] > 0
    with load(art, max_context=256, threads=2) as rt:
        rt.prefill([151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198])
        out = []
        for _ in range(8):
            t = int(np.argmax(rt.logits()))
            out.append(t)
            rt.decode(t)
        assert len(out) == 8 and all(0 <= t < 151936 for t in out)
        assert np.isfinite(rt.logits()).all()
    for name, fb in q.get("fallbacks", {}).items():
        assert fb["type"] and fb["reason"], name


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_onnx_quants_of_05b_run(ckpt_05b, tmp_path, quant):
    art = export(ckpt_05b, "onnx", quant, tmp_path, name=f"q05-onnx-{quant}")
    with load(art, max_context=256, threads=2) as rt:
        rt.prefill([151644, 872, 198, 9707])
        assert np.isfinite(rt.logits()).all() and rt.logits().shape == (151936,)


def test_onnx_int4_05b_runtime_peak_rss_within_budget(ckpt_05b, tmp_path):
    """Issue 5's memory target: a fresh process that loads the int4 Qwen2.5-0.5B, prefills 128 tokens and decodes 128
    peaks under 1.5 x the artifact size plus its KV cache (measured 519 MiB against 641 MiB; 790 MiB before the LM head
    was packed first and the idle mapped weights released)."""
    import json
    import subprocess
    import sys

    art = export(ckpt_05b, "onnx", "int4", tmp_path, name="q05-onnx-int4-rss")
    code = (
        "import json, sys\n"
        "from qwen_edge.backends import load\n"
        "from qwen_edge.bench import peak_rss_bytes\n"
        "rt = load(sys.argv[1], threads=2)\n"
        "rt.prefill(list(range(1000, 1128)))\n"
        "for _ in range(128):\n"
        "    rt.decode(int(rt.logits().argmax()))\n"
        "print(json.dumps({'peak': peak_rss_bytes(), 'kv': rt.info.extra['kv_cache_bytes']}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    size = Artifact.open(art).size_bytes
    assert got["peak"] < 1.5 * size + got["kv"], (got, size)


def test_onnx_int4_export_of_15b_peak_rss_bounded(tmp_path_factory):
    """Issue 12: the ONNX exporter streams each weight to model.onnx.data in row chunks and releases the checkpoint's
    mapped pages, so a fresh process exporting the synthesized Qwen2.5-1.5B (2.9 GiB bf16) to int4 peaks far under
    2 GB (measured 153 MiB; 3569 MiB before the change, 3.2 GB with only the page release disabled)."""
    import json
    import subprocess
    import sys

    ckpt = synth("qwen2.5-1.5b", tmp_path_factory.mktemp("full15") / "qwen2.5-1.5b")
    out = tmp_path_factory.mktemp("full15-out")
    code = (
        "import json, sys\n"
        "from qwen_edge.bench import peak_rss_bytes\n"
        "from qwen_edge.export import export\n"
        "p = export(sys.argv[1], 'onnx', 'int4', sys.argv[2], name='q15-onnx-int4')\n"
        "print(json.dumps({'peak': peak_rss_bytes(), 'path': str(p)}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(ckpt), str(out)], capture_output=True, text=True, check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    art = Artifact.open(got["path"])
    assert art.quant == "int4" and art.size_bytes > 1e9
    assert got["peak"] <= 2e9, got
