"""bench: two tiny artifacts measured interleaved via the CLI -> JSON, markdown and PNG; budgets gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_edge.bench.run import check_budgets, parse_budget
from conftest import has_module
from qwen_edge.errors import QwenEdgeError

RESULT_KEYS = {"artifact", "format", "quant", "decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s",
               "peak_rss_bytes", "size_bytes", "bits_per_weight", "load_s", "inter_token_latency_s",
               "ratio_to_first", "roofline", "decode_tokens"}


@pytest.fixture(scope="module")
def two(exported):
    return [exported("tiny-qwen3", "gguf", "q8_0"), exported("tiny-qwen3", "onnx", "int4")]


@pytest.fixture(scope="module")
def bench_run(two, cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    r = cli("bench", *map(str, two), "--prompt-tokens", "16", "--gen-tokens", "8", "--repeat", "2",
            "--threads", "1", "--json", "--markdown", str(out / "bench.md"), "--plot", str(out / "bench.png"))
    return r, out


def test_bench_cli_writes_json_markdown_and_png(bench_run, two):
    r, out = bench_run
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # stdout holds the JSON document only
    assert {"machine", "results", "config"} <= set(report)
    assert report["machine"]["read_bandwidth_gbps"] > 0 and report["machine"]["cpu"]
    assert [x["artifact"] for x in report["results"]] == [str(p) for p in two]
    assert [(x["format"], x["quant"]) for x in report["results"]] == [("gguf", "q8_0"), ("onnx", "int4")]
    md = (out / "bench.md").read_text()
    assert md.count("\n| tiny-qwen3") == 2 and "decode tok/s" in md
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bench_numbers_are_positive_and_consistent(bench_run):
    report = json.loads(bench_run[0].stdout)
    for x in report["results"]:
        assert RESULT_KEYS <= set(x)
        for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s", "load_s"):
            s = x[k]
            assert 0 < s["min"] <= s["median"] <= s["max"], (k, s)
        assert x["generated_tokens"] == 8 and x["decode_tokens"] == 7  # the first token comes from prefill
        assert x["prompt_tokens"] == 16 and x["repeats"] == 2 and x["threads"] == 1
        assert 0 < x["inter_token_latency_s"]["p50"] <= x["inter_token_latency_s"]["p95"]
        assert x["peak_rss_bytes"] > 20e6 and x["size_bytes"] > 1e6 and x["bits_per_weight"] > 0
        roof = x["roofline"]
        assert roof["bytes_per_token"] > 0 and roof["bound_tokens_per_s"] > 0 and roof["fraction"] > 0
    first, second = report["results"]
    assert first["ratio_to_first"]["decode_tokens_per_s"] == 1.0
    assert second["ratio_to_first"]["decode_tokens_per_s"] == pytest.approx(
        second["decode_tokens_per_s"]["median"] / first["decode_tokens_per_s"]["median"])
    # the tied tiny model's head is the whole embedding table: the roofline reads it every token (in the ONNX int4
    # artifact the Gather's view over the head's bytes is not subtracted as a gather-only table)
    for x in report["results"]:
        assert x["roofline"]["weight_bytes"] > 151936 * 64  # >= one byte per head weight
        assert x["roofline"]["embedding_rows_excluded_bytes"] == 0
    # paired ratios (per repeat, back to back) and the RSS budget (1.5 x size + KV cache)
    assert first["paired_ratio_to_first"]["decode_tokens_per_s"]["median"] == 1.0
    ps = second["paired_ratio_to_first"]["prefill_tokens_per_s"]
    assert 0 < ps["min"] <= ps["median"] <= ps["max"]
    kv = {x["format"]: x["kv_cache_bytes"] for x in report["results"]}
    ctx = report["config"]["max_context"]
    # llama.cpp's f16 cache; the int4 ONNX export's fp32 cache (cpu-x86_64 default), as the backend allocates it
    assert kv == {"gguf": 2 * 2 * 2 * 32 * ctx * 2, "onnx": 2 * 2 * 2 * 32 * ctx * 4}
    assert {x["format"]: x["kv_dtype"] for x in report["results"]} == {"gguf": "float16", "onnx": "float32"}
    for x in report["results"]:
        assert x["rss_budget_bytes"] == int(1.5 * x["size_bytes"] + x["kv_cache_bytes"])


def test_budget_that_cannot_be_met_exits_1(two, cli):
    r = cli("bench", str(two[0]), "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1", "--warmup", "0",
            "--budget", "decode_tokens_per_s>=1e12", "--budget", "time_to_first_token_s<=100")
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("failed: ") and "decode_tokens_per_s" in last and two[0].name in last
    assert "time_to_first_token_s" not in r.stderr
    assert "| tiny-qwen3" in r.stdout  # the human table still comes out


@pytest.mark.parametrize("expr", ["decode_tokens_per_s=>20", "speed>=3", "decode_tokens_per_s>=fast", ""])
def test_bad_budget_expression_exits_2_before_measuring(two, cli, expr):
    r = cli("bench", str(two[0]), "--budget", expr)
    assert r.returncode == 2 and r.stderr.startswith("error: budget"), r.stderr


def test_budget_parsing_and_checking():
    assert parse_budget(" decode_tokens_per_s >= 20 ") == ("decode_tokens_per_s", ">=", 20.0)
    assert parse_budget("time_to_first_token_s<0.5") == ("time_to_first_token_s", "<", 0.5)
    with pytest.raises(QwenEdgeError):
        parse_budget("decode_tokens_per_s>=inf")
    res = [{"name": "a", "decode_tokens_per_s": {"median": 10.0}, "peak_rss_bytes": 5},
           {"name": "b", "decode_tokens_per_s": {"median": 30.0}, "peak_rss_bytes": 50}]
    assert check_budgets(res, ["decode_tokens_per_s>=20"]) == ["a: decode_tokens_per_s 10 (budget >= 20)"]
    assert len(check_budgets(res, ["peak_rss_bytes<=10", "decode_tokens_per_s>=5"])) == 1


def test_missing_artifact_exits_2(cli, tmp_path):
    r = cli("bench", str(tmp_path / "none"))
    assert r.returncode == 2 and "no such artifact" in r.stderr


def test_bench_of_the_torch_reference_and_a_thread_sweep(synth_ckpt, exported, tmp_path):
    pytest.importorskip("torch")
    from qwen_edge.bench.report import markdown_table, plot
    from qwen_edge.bench.run import bench

    ckpt = synth_ckpt("tiny-qwen3")
    report = bench([exported("tiny-qwen3", "gguf", "q8_0"), ckpt], prompt_tokens=8, gen_tokens=4, repeat=1,
                   warmup=0, thread_sweep=[1, 2])
    assert [(x["format"], x["threads"]) for x in report["results"]] == [("gguf", 1), ("hf", 1), ("gguf", 2), ("hf", 2)]
    hf = report["results"][1]
    assert hf["backend"] == "torch" and hf["roofline"]["method"].startswith("fp32")
    assert report["results"][2]["ratio_to_first"]["decode_tokens_per_s"] == 1.0  # ratios per thread count
    assert markdown_table(report).count("\n| ") == 4
    p = plot(report, tmp_path / "sweep.png")
    assert Path(p).stat().st_size > 5000


def test_bench_default_context_fits_an_artifact_with_a_short_context(synth_ckpt, tmp_path):
    """The default KV size (prompt + generated, rounded up to 256) never asks for more than the artifact holds."""
    from qwen_edge.bench.run import bench
    from qwen_edge.export import export

    art = export(synth_ckpt("tiny-qwen2"), "gguf", "q8_0", tmp_path, name="short", context_length=200)
    report = bench([art], prompt_tokens=16, gen_tokens=8, repeat=1, warmup=0, threads=1)
    assert report["results"][0]["generated_tokens"] == 8
    with pytest.raises(QwenEdgeError, match="exceed the artifact's context length 200"):
        bench([art], prompt_tokens=190, gen_tokens=16, repeat=1, threads=1)


def test_bench_reports_the_onnx_kv_dtype_it_ran(exported):
    """An fp16-KV export (kv_dtype=float16) reports half the fp32 one's cache, and the roofline reads 2 bytes per
    cached element instead of 4: bench takes the dtype from the artifact, never a constant."""
    from qwen_edge.bench.run import bench

    fp16 = exported("tiny-qwen3", "onnx", "int4", kv_dtype="float16")
    fp32 = exported("tiny-qwen3", "onnx", "int4")
    report = bench([fp16, fp32], prompt_tokens=8, gen_tokens=4, repeat=1, warmup=0, threads=1)
    ctx = report["config"]["max_context"]
    a, b = report["results"]
    assert (a["kv_dtype"], b["kv_dtype"]) == ("float16", "float32")
    assert (a["kv_cache_bytes"], b["kv_cache_bytes"]) == (2 * 2 * 2 * 32 * ctx * 2, 2 * 2 * 2 * 32 * ctx * 4)
    assert b["roofline"]["kv_bytes"] == pytest.approx(2 * a["roofline"]["kv_bytes"], abs=2)


# --- --engine onnxruntime-genai (issue 17): the app path, measured beside our backend ------------------------------
@pytest.mark.skipif(not has_module("onnxruntime_genai"), reason="onnxruntime-genai not installed")
def test_bench_runs_an_onnx_artifact_through_onnxruntime_genai_beside_our_backend(exported, cli, tmp_path):
    """One artifact under both engines: two rows, same prompt and token counts, the generator's own timing, and
    the same greedy tokens (the generator reads our graph's last-position logits as they are)."""
    art = exported("tiny-qwen3", "onnx", "int4")
    r = cli("bench", str(art), "--engine", "qwen-edge,onnxruntime-genai", "--prompt-tokens", "16", "--gen-tokens",
            "8", "--repeat", "2", "--threads", "1", "--json", "--markdown", str(tmp_path / "b.md"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    ours, genai = report["results"]
    assert (ours["engine"], genai["engine"]) == ("qwen-edge", "onnxruntime-genai")
    assert (ours["backend"], genai["backend"]) == ("onnxruntime", "onnxruntime-genai")
    assert ours["name"] == f"{art.name} [qwen-edge]" and genai["name"] == f"{art.name} [onnxruntime-genai]"
    assert report["config"]["engines"] == ["qwen-edge", "onnxruntime-genai"]
    for x in (ours, genai):
        assert RESULT_KEYS <= set(x) and x["threads"] == 1 and x["repeats"] == 2
        assert x["prompt_tokens"] == 16 and x["generated_tokens"] == 8 and x["decode_tokens"] == 7
        for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s", "load_s"):
            assert 0 < x[k]["min"] <= x[k]["median"] <= x[k]["max"], (k, x[k])
    assert genai["generated_ids"] == ours["generated_ids"]
    assert genai["kv_cache_bytes"] == ours["kv_cache_bytes"] and genai["kv_dtype"] == "float32"
    assert genai["roofline"]["bytes_per_token"] == ours["roofline"]["bytes_per_token"]
    assert genai["paired_ratio_to_first"]["decode_tokens_per_s"]["median"] > 0
    assert "[onnxruntime-genai]" in (tmp_path / "b.md").read_text()


@pytest.mark.skipif(not has_module("onnxruntime_genai"), reason="onnxruntime-genai not installed")
def test_bench_runs_an_onnxruntime_genai_model_folder(exported, tmp_path):
    """A folder another tool made for onnxruntime-genai (no manifest.json: its builder's) runs under that engine,
    its facts read from genai_config.json and the graph; our backend refuses it with a one-line error."""
    import shutil

    from qwen_edge.bench.run import bench

    folder = tmp_path / "genai-model"
    shutil.copytree(exported("tiny-qwen3", "onnx", "int4"), folder)
    (folder / "manifest.json").unlink()
    report = bench([(folder, "onnxruntime-genai")], prompt_tokens=8, gen_tokens=4, repeat=1, warmup=0, threads=1)
    (x,) = report["results"]
    assert x["quant"] == "int4/int8" and x["format"] == "onnx" and x["generated_tokens"] == 4
    assert {Path(f).name for f in [x["artifact"]]} == {"genai-model"}
    assert x["size_bytes"] == sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    assert x["kv_dtype"] == "float32" and x["roofline"]["kv_bytes"] > 0
    with pytest.raises(QwenEdgeError, match="not a qwen-edge artifact"):
        bench([folder], prompt_tokens=8, gen_tokens=4, repeat=1, threads=1)


@pytest.mark.parametrize("engine,match", [("onnxruntime-genai", "runs ONNX models, not gguf"),
                                          ("llama", "unknown engine 'llama'")])
def test_bench_engine_misuse_exits_2(two, cli, engine, match):
    r = cli("bench", str(two[0]), "--engine", engine, "--repeat", "1")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and match in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_engine_without_onnxruntime_genai_installed_is_one_error(two, monkeypatch):
    import sys

    from qwen_edge.bench.run import bench

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as when not installed
    with pytest.raises(QwenEdgeError, match=r"needs onnxruntime-genai: pip install 'qwen-edge\[genai\]'"):
        bench([two[1]], engine="onnxruntime-genai", prompt_tokens=8, gen_tokens=4, repeat=1, threads=1)
