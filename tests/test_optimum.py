"""Hugging Face users' door to the ONNX artifacts (issue 28): optimum's ORTModelForCausalLM, transformers' generate
and pipeline, run in a virtualenv of their own (optimum-onnx pins transformers < 4.58, the project pins 5.x).

The virtualenv is built once per set of pins under a cache directory (tests/side_venv.py:
QWEN_EDGE_OPTIMUM_CACHE, default /var/cache/qwen-edge-optimum, else ~/.cache/qwen-edge-optimum) and reused;
tests/optimum_check.py runs inside it and reports what optimum saw. Where the virtualenv cannot be built (no package
index), the test skips and says why."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from side_venv import side_venv
from test_onnx_export import PROMPT, greedy_run

PINS = ("optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "torch==2.13.0", "onnxruntime==1.32.0",
        "onnx==1.23.2")
"""optimum-onnx 0.1.0 wants optimum ~= 2.1.0 and transformers >= 4.36, < 4.58; torch 2.13.0 is the project's own
pin (a CPU wheel; a looser spec can pull a multi-GB CUDA build); onnxruntime and onnx as the project pins them."""
ARTIFACTS = {"qwen3-fp32": ("tiny-qwen3", "fp32"), "qwen3-int4": ("tiny-qwen3", "int4"),
             "qwen2-int4": ("tiny-qwen2", "int4")}
SHORT = PROMPT[3:9]
NEW_TOKENS = 8
TEXT = "Hello, how are you?"


@pytest.fixture(scope="module")
def optimum_report(exported):
    arts = {label: exported(arch, "onnx", quant) for label, (arch, quant) in ARTIFACTS.items()}
    req = {"artifacts": {label: str(a) for label, a in arts.items()}, "prompt": PROMPT, "short": SHORT,
           "new_tokens": NEW_TOKENS, "text": TEXT}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    p = subprocess.run([str(side_venv("optimum", PINS)), str(Path(__file__).with_name("optimum_check.py")),
                        json.dumps(req)],
                       capture_output=True, text=True, env=env, cwd=str(arts["qwen3-fp32"].parent))
    assert p.returncode == 0, p.stderr[-3000:]
    return arts, json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("label", list(ARTIFACTS))
def test_optimum_loads_and_matches_qwen_edge(label, optimum_report):
    """ORTModelForCausalLM.from_pretrained(artifact) with no legacy warning; greedy ids are qwen-edge's; a
    left-padded batch of two gives each row its single-run logits and ids; a right-padded batch's full-sequence
    logits (logits_to_keep = 0) are each row's own; pipeline("text-generation") generates qwen-edge's ids and
    AutoTokenizer's chat template gives qwen-edge's ids. Qwen3
    needs the README's one-line fix for optimum-onnx 0.1.0 (its empty first cache is hidden/heads wide, not
    head_dim); Qwen2 runs as loaded."""
    arts, report = optimum_report
    r = report[label]
    arch, quant = ARTIFACTS[label]
    assert r["head_dim_fix"] is (arch == "tiny-qwen3")
    assert "position_ids" in r["inputs"]
    assert not [line for line in r["load_log"] if "legacy" in line.lower()], r["load_log"]
    ours, _ = greedy_run(arts[label], PROMPT, NEW_TOKENS)
    assert r["greedy"] == ours
    tol = {"fp32": 1e-4, "int4": 2e-3}[quant]
    assert r["left_batch_max_diff"] < tol
    assert r["left_batch_argmax"] == r["alone_argmax"]
    assert r["left_batch_decode_max_diff"] < tol
    assert r["left_batch_greedy"] == r["alone_greedy"] and r["alone_greedy"][0] == ours
    assert r["right_full_shape"] == [2, len(PROMPT), 151936]
    assert r["right_full_max_diff"] < tol
    from qwen_edge.text.tokenizer import Tokenizer

    ids, tok = r["text_ids"], Tokenizer.from_dir(arts[label])
    assert r["pipeline_text"].startswith(TEXT) and ids == tok.encode(TEXT)
    assert r["chat_ids"] == tok.encode_chat([{"role": "user", "content": TEXT}])  # AutoTokenizer's template
    assert r["pipeline_ids"][:len(ids)] == ids
    assert r["pipeline_ids"][len(ids):] == greedy_run(arts[label], ids, NEW_TOKENS)[0]
