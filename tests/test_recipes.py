"""Export recipes: every shipped recipe validates, every combination exports, overrides, reproducibility, CI listing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import requires_torch

from qwen_edge.errors import QwenEdgeError
from qwen_edge.families import MODELS
from qwen_edge.recipes.recipe import RECIPES_DIR, list_recipes, load_recipe, render_recipes
from qwen_edge.recipes.recipe_run import run_export

RECIPE_FILES = sorted(RECIPES_DIR.glob("*.yaml"))
TINY = {"qwen2": "tiny-qwen2", "qwen3": "tiny-qwen3"}


def _combos() -> list[tuple[str, str, str, str]]:
    """One recipe per distinct (format, quant options, target), with the family to export it from."""
    seen: dict[tuple, tuple[str, str, str, str]] = {}
    for p in RECIPE_FILES:
        r = load_recipe(p)
        key = (r.format, json.dumps(r.quant.__dict__, sort_keys=True), r.target)
        seen.setdefault(key, (p.name, r.format, r.quant.type, r.target))
    return sorted(seen.values())


def _sha_all(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_recipes_exist_for_every_required_combination():
    rows = {(r["model"], r["format"], r["quant"], r["target"]) for r in list_recipes()}
    names = {r["name"] for r in list_recipes()}
    required_models = ["qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "qwen2.5-3b-instruct",
                       "qwen2.5-coder-1.5b-instruct", "qwen2.5-math-1.5b-instruct", "qwen3-0.6b", "qwen3-1.7b"]
    combos = ["gguf-q4_k_m.cpu", "gguf-q8_0.cpu", "onnx-int4.cpu", "gguf-q4_0.arm64", "onnx-int4.arm64",
              "onnx-fp16.cuda", "gguf-q8_0.cuda"]
    for m in required_models:
        for c in combos:
            assert f"{m}.{c}" in names, f"missing recipe {m}.{c}"
    assert len(rows) >= 7


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.stem for p in RECIPE_FILES])
def test_every_recipe_loads_and_validates(path):
    r = load_recipe(path)
    assert r.name == path.name[: -len(".yaml")], "recipe name must match its file name"
    assert r.model in MODELS and r.source.startswith("Qwen/")
    assert r.format in ("gguf", "onnx") and r.quant.type
    assert r.max_context and r.max_context <= MODELS[r.model].arch.max_position_embeddings
    assert r.output and "/" not in r.output
    if r.target == "arm64-mobile" and r.format == "onnx":
        assert r.quant.type == "int4" and r.quant.accuracy_level == 4  # int8 compute on mobile CPUs


def test_recipe_outputs_are_unique():
    outs = [load_recipe(p).output for p in RECIPE_FILES]
    assert len(outs) == len(set(outs))


@pytest.mark.parametrize("combo", _combos(), ids=lambda c: f"{c[1]}-{c[2]}-{c[3]}")
def test_each_recipe_combination_exports_from_a_tiny_checkpoint(combo, synth_ckpt, tmp_path):
    from qwen_edge.model.artifact import Artifact

    fname, fmt, quant, target = combo
    r = load_recipe(RECIPES_DIR / fname)
    tiny = TINY[MODELS[r.model].arch.family]
    src = synth_ckpt(tiny)
    rc = run_export(None, None, None, None, str(tmp_path), recipe_path=str(RECIPES_DIR / fname),
                    overrides={"source_path": str(src), "model": tiny, "max_context": "1024"}, verify=False)
    assert rc == 0
    art = Artifact.open(tmp_path / r.output)
    assert (art.format, art.quant, art.manifest["target"]) == (fmt, quant, target)
    assert art.context_length == 1024
    assert art.manifest["recipe"]["name"] == r.name
    assert art.manifest["recipe"]["options"] == r.quant.options()
    if fmt == "onnx" and quant == "int4":
        assert art.manifest["quantization"]["accuracy_level"] == r.quant.accuracy_level
        assert art.manifest["quantization"]["block_size"] == r.quant.block_size


def test_unknown_key_names_the_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("source: Qwen/Qwen3-0.6B\nformat: gguf\nquant:\n  type: q8_0\n  blocksize: 32\n")
    with pytest.raises(QwenEdgeError) as e:
        load_recipe(p)
    assert "quant.blocksize" in str(e.value) and str(p) in str(e.value)
    p.write_text("source: Qwen/Qwen3-0.6B\nformat: gguf\nquant: q8_0\ntargte: cuda\n")
    with pytest.raises(QwenEdgeError, match="unknown key 'targte'"):
        load_recipe(p)


@pytest.mark.parametrize("text,match", [
    ("- a list\n", "must be a mapping"),
    ("source: x\nformat: tflite\nquant: q8_0\n", "format"),
    ("source: x\nformat: gguf\nquant: int4\n", "no quantization 'int4'"),
    ("source: x\nformat: gguf\nquant: {type: q4_0, block_size: 64}\n", "ONNX only"),
    ("source: x\nformat: onnx\nquant: {type: int4, block_size: 48}\n", "block_size"),
    ("source: x\nformat: onnx\nquant: int4\ntarget: tpu\n", "unknown target"),
    ("source: x\nformat: onnx\nquant: int4\nmax_context: many\n", "max_context"),
    ("source: x\nformat: onnx\nquant: int4\noutput: ../../etc\n", "plain directory name"),
    ("source: x\nformat: onnx\nquant: int4\noutput: /abs/path\n", "plain directory name"),
    ("source: x\nformat: onnx\nquant: int4\nmodel: qwen9-7b\n", "unknown model"),
    ("format: onnx\nquant: int4\n", "'source' is required"),
    ("source: x\nformat: onnx\nquant: int4\nverify: {thresholds: {kl_mean: high}}\n", "number"),
    ("source: [x\n", "invalid YAML"),
])
def test_invalid_recipes_are_one_line_errors(tmp_path, text, match):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(QwenEdgeError, match=match) as e:
        load_recipe(p)
    assert "\n" not in str(e.value)


def test_dotted_overrides_apply_with_yaml_typing():
    name = "qwen2.5-0.5b-instruct.onnx-int4.cpu"
    r = load_recipe(name, {"quant.block_size": "64", "quant.symmetric": "false", "verify.quick": "true",
                           "verify.thresholds.kl_mean": "0.25", "max_context": "1024", "output": "mine"})
    assert r.quant.block_size == 64 and r.quant.symmetric is False and r.verify.quick is True
    assert r.verify.thresholds == {"kl_mean": 0.25} and r.max_context == 1024 and r.output == "mine"
    assert r.quant.options() == {"block_size": 64, "symmetric": False, "accuracy_level": 4}
    r = load_recipe(name, {"format": "gguf", "quant": "q6_k", "quant.block_size": "null",
                           "quant.accuracy_level": "null"})
    assert (r.format, r.quant.type, r.quant.options()) == ("gguf", "q6_k", {})


@pytest.mark.parametrize("key,value,match", [
    ("quant.blok_size", "64", "unknown key 'quant.blok_size'"),
    ("nonsense", "1", "unknown key 'nonsense'"),
    ("quant.block_size", "sixty", "block_size"),
    ("verify", "true", "is a section"),
    ("max_context.x", "1", "not a section"),
    ("quant.block_size", "[1, 2]", "scalar"),
])
def test_bad_overrides_are_errors(key, value, match):
    with pytest.raises(QwenEdgeError, match=match):
        load_recipe("qwen2.5-0.5b-instruct.onnx-int4.cpu", {key: value})


def test_export_needs_a_recipe_or_source_format_quant(tmp_path):
    with pytest.raises(QwenEdgeError, match="--recipe FILE, or SOURCE with --format and --quant"):
        run_export("some/dir", "gguf", None, None, str(tmp_path))


def test_recipe_model_mismatch_is_refused(synth_ckpt, tmp_path):
    with pytest.raises(QwenEdgeError, match="not a qwen2.5-0.5b checkpoint"):
        run_export(str(synth_ckpt("tiny-qwen2")), None, None, None, str(tmp_path),
                   recipe_path="qwen2.5-0.5b-instruct.gguf-q8_0.cpu", verify=False)


@pytest.fixture
def says(capsys):
    """The CLI's stderr messages of run_export, called in this process (the CLI's main() configures the same)."""
    from qwen_edge.log import NORMAL, configure

    configure(NORMAL, bars=False)  # messages go to sys.stderr, which capsys captures
    return capsys


@pytest.mark.parametrize("recipe", ["qwen3-0.6b.gguf-q4_k_m.cpu", "qwen3-0.6b.onnx-int4.cpu"])
def test_export_is_reproducible_and_skipped_when_up_to_date(recipe, synth_ckpt, tmp_path, says):
    capsys = says
    src = synth_ckpt("tiny-qwen3")
    over = {"source_path": str(src), "model": "tiny-qwen3", "output": "a"}
    assert run_export(None, None, None, None, str(tmp_path / "one"), recipe, over, verify=False) == 0
    first = capsys.readouterr().err
    assert first.count("\n") == 2 and first.startswith("export ") and "exported in" in first and "verify off" in first
    art = tmp_path / "one" / "a"
    before = _sha_all(art)
    mtime = (art / "manifest.json").stat().st_mtime_ns
    # same inputs: skipped, nothing rewritten
    assert run_export(None, None, None, None, str(tmp_path / "one"), recipe, over, verify=False) == 0
    assert "up to date, export skipped" in capsys.readouterr().err
    assert (art / "manifest.json").stat().st_mtime_ns == mtime
    # --force redoes it, byte for byte
    assert run_export(None, None, None, None, str(tmp_path / "one"), recipe, over, verify=False, force=True) == 0
    assert "exported in" in capsys.readouterr().err
    assert _sha_all(art) == before
    # a fresh output directory gives the same bytes and the same manifest (no timestamps, no temp paths)
    assert run_export(None, None, None, None, str(tmp_path / "two"), recipe, over, verify=False) == 0
    assert _sha_all(tmp_path / "two" / "a") == before
    manifest = (art / "manifest.json").read_text()
    assert ".tmp" not in manifest and str(tmp_path) not in manifest
    # a changed option rebuilds
    if recipe.endswith("onnx-int4.cpu"):
        over2 = {**over, "quant.block_size": "64"}
        assert run_export(None, None, None, None, str(tmp_path / "one"), recipe, over2, verify=False) == 0
        assert "exported in" in capsys.readouterr().err
        from qwen_edge.formats.onnx import DATA_FILE

        assert _sha_all(art)[DATA_FILE] != before[DATA_FILE]


def test_corrupt_existing_artifact_is_rebuilt(synth_ckpt, tmp_path, says):
    capsys = says
    src = str(synth_ckpt("tiny-qwen2"))
    assert run_export(src, "gguf", "q8_0", None, str(tmp_path), name="x", verify=False) == 0
    good = _sha_all(tmp_path / "x")
    with open(tmp_path / "x" / "model.gguf", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\xff" * 10)
    capsys.readouterr()
    assert run_export(src, "gguf", "q8_0", None, str(tmp_path), name="x", verify=False) == 0
    assert "exported in" in capsys.readouterr().err
    assert _sha_all(tmp_path / "x") == good


def test_verify_missing_extra_is_reported(synth_ckpt, tmp_path, says, monkeypatch):
    capsys = says
    import qwen_edge.recipes.recipe_run as recipe_run

    monkeypatch.setattr(recipe_run, "verify_available", lambda: False)
    assert run_export(str(synth_ckpt("tiny-qwen2")), "gguf", "q8_0", None, str(tmp_path), verify=True) == 0
    assert "verify skipped (install qwen-edge[verify]" in capsys.readouterr().err


def test_recipes_cli_json_is_a_ci_matrix(cli):
    r = cli("recipes", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == len(RECIPE_FILES)
    for row in rows:
        assert {"name", "file", "model", "format", "quant", "target"} <= set(row)
        assert Path(row["file"]).name == row["name"] + ".yaml"
    text = cli("recipes")
    assert text.returncode == 0 and "qwen3-0.6b.onnx-int4.arm64" in text.stdout
    assert render_recipes(list_recipes()).splitlines()[0].startswith("NAME")


def test_cli_export_recipe_by_name_with_set(cli, synth_ckpt, tmp_path):
    src = synth_ckpt("tiny-qwen2")
    r = cli("export", "--recipe", "qwen2.5-0.5b-instruct.gguf-q4_0.arm64", str(src), "--set", "model=tiny-qwen2",
            "--no-verify", "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("export ") and "gguf q4_0" in lines[1] and "bpw" in lines[1]
    assert (tmp_path / "qwen2.5-0.5b-instruct-gguf-q4_0-arm64" / "manifest.json").is_file()
    bad = cli("export", "--recipe", "qwen2.5-0.5b-instruct.gguf-q4_0.arm64", "--set", "quant.bits=3", "-o",
              str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "quant.bits" in bad.stderr
    missing = cli("export", "-o", str(tmp_path))
    assert missing.returncode == 2 and "--recipe" in missing.stderr


@requires_torch
def test_export_verifies_reuses_a_recorded_pass_and_gates(cli, synth_ckpt, tmp_path):
    src = str(synth_ckpt("tiny-qwen3"))
    base = ["export", "--recipe", "qwen3-0.6b.gguf-q8_0.cpu", src, "--set", "model=tiny-qwen3", "--set",
            "verify.quick=true", "-o", str(tmp_path)]
    first = cli(*base)
    assert first.returncode == 0, first.stderr
    announce, summary = first.stderr.splitlines()  # what it will do, then what it did
    assert announce.startswith(f"export {src} -> ") and "then verify it against the PyTorch reference" in announce
    assert "verify passed" in summary and "[random weights: top-1 and greedy agreement not gated]" in summary
    assert json.loads((tmp_path / "qwen3-0.6b-gguf-q8_0-cpu" / "manifest.json").read_text())["parity"]["passed"]
    again = cli(*base)
    assert again.returncode == 0 and "export skipped" in again.stderr and "passed (recorded" in again.stderr
    strict = cli(*base, "--set", "verify.thresholds.top1_agreement=1.01")  # an unreachable gate
    assert strict.returncode == 1, strict.stderr
    assert "verify FAILED (top1_agreement)" in strict.stderr and "export skipped" in strict.stderr
    assert "failed: verify:" in strict.stderr and "top1_agreement" in strict.stderr.splitlines()[-1]
    off = cli(*base, "--no-verify")
    assert off.returncode == 0 and "verify off (--no-verify)" in off.stderr


def test_readme_usage_export_of_a_synthesized_checkpoint_says_what_it_does_and_passes(cli, synth_ckpt, tmp_path):
    """The README's path: synth, then export with the [verify] extra installed. Verify runs (announced first); on
    random weights it gates KL, logit error and perplexity but not top-1/greedy agreement, and says so."""
    pytest.importorskip("torch")
    src = str(synth_ckpt("tiny-qwen3"))
    r = cli("export", src, "--format", "gguf", "--quant", "q4_k_m", "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "then verify it against the PyTorch reference (minutes on 0.5B and up); --no-verify skips that" in r.stderr
    assert "verify passed" in r.stderr and "random weights" in r.stderr
    parity = json.loads((tmp_path / "tiny-qwen3-s0-gguf-q4_k_m" / "manifest.json").read_text())["parity"]
    assert parity["random_weights"] is True
    assert sorted(parity["ungated"]) == ["greedy_common_prefix_mean", "greedy_common_prefix_min", "top1_agreement"]
    assert parity["thresholds"]["kl_mean"] > 0 and "kl_mean" not in parity["ungated"]
    v = cli("verify", str(tmp_path / "tiny-qwen3-s0-gguf-q4_k_m"), "--quick")
    assert v.returncode == 0 and "reported, not gated" in v.stdout
