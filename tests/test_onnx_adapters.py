"""Run-time LoRA on ONNX: `--adapter-mode separate` gives the graph LoRA inputs (empty by default) and ships each
adapter as an onnxruntime `.onnx_adapter` beside the unmodified base weights, the layout onnxruntime-genai's
multi-LoRA `Adapters` load. The adapter is made with PEFT on a tiny checkpoint (test_adapters' helper): the separate
export gives the merged export's ids (which are transformers + PEFT's) through our backend and through
onnxruntime-genai with the adapter active, and the base's ids without it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import has_module, requires_torch
from test_adapters import PROMPT, _ids, _logits, _make_adapter
from test_adapters import adapter, base, work  # noqa: F401 (module fixtures: the tiny base, a PEFT LoRA r4/alpha 8)

pytestmark = [requires_torch, pytest.mark.skipif(not has_module("peft"), reason="needs peft (the [verify] extra)")]


@pytest.fixture(scope="module")
def arts(base, adapter, work):
    from qwen_edge.export import export

    out = work / "arts"
    return {
        "merged": export(base, "onnx", "fp32", out, name="merged", adapters=[adapter]),
        "separate": export(base, "onnx", "fp32", out, name="separate", adapters=[adapter], adapter_mode="separate"),
        "base": export(base, "onnx", "fp32", out, name="base"),
    }


def _graph_inputs(art):
    import onnx

    return [i.name for i in onnx.load_model(str(art / "model.onnx"), load_external_data=False).graph.input]


def test_separate_onnx_matches_merged(base, adapter, arts):
    """Our backend feeds the artifact's .onnx_adapter (or one given as adapter=) and gives the merged export's ids,
    which are transformers + PEFT's; scale 0 gives the base export's; only the separate graph has LoRA inputs."""
    sep = arts["separate"]
    rec = json.loads((sep / "manifest.json").read_text())["adapters"][0]
    assert (rec["mode"], rec["file"], rec["rank"], rec["scale_in_lora_b"]) == ("separate", "adapter.onnx_adapter", 4,
                                                                              True)
    from qwen_edge.cli.inspect import inspect, render_inspect

    assert "· separate adapter.onnx_adapter" in render_inspect(inspect(sep))
    assert "adapter.onnx_adapter" in [f["path"] for f in json.loads((sep / "manifest.json").read_text())["files"]]
    lora = [n for n in _graph_inputs(sep) if ".lora_" in n]
    # tiny-qwen3: 2 layers x (qkv, o, gate_up, down), an A and a B each
    assert len(lora) == 16 and "model.layers.0.attn.qkv_proj.lora_A.weight" in lora
    assert not [n for n in _graph_inputs(arts["base"]) if ".lora_" in n]
    merged = _ids(arts["merged"])
    assert merged == _ids(base, adapters=[adapter])
    assert _ids(sep) == merged
    assert _ids(sep, adapter=str(sep / "adapter.onnx_adapter")) == merged
    np.testing.assert_allclose(_logits(sep), _logits(arts["merged"]), atol=1e-3)
    plain = _ids(arts["base"])
    assert plain != merged
    assert _ids(sep, adapter_scale=0.0) == plain
    assert _ids(sep, adapter=[]) == plain


def _genai_ids(path, adapters=(), active=None, n=8):
    """Greedy ids from onnxruntime-genai on its own: og.Adapters loads each file (named by its position), the one
    at index `active` (if any) is set active on the generator."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(path))
    loaded = og.Adapters(model)
    for i, f in enumerate(adapters):
        loaded.load(str(f), f"lora{i}")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + n, do_sample=False, repetition_penalty=1.0)
    gen = og.Generator(model, params)
    if active is not None:
        gen.set_active_adapter(loaded, f"lora{active}")
    gen.append_tokens(PROMPT)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(PROMPT):]


def test_onnxruntime_genai_loads_the_pair(arts):
    """onnxruntime-genai on its own: og.Adapters loads the .onnx_adapter, set_active_adapter gives the merged
    export's greedy ids; a generator without it active runs the base."""
    sep = arts["separate"]
    merged = _genai_ids(arts["merged"])
    assert _genai_ids(sep, [sep / "adapter.onnx_adapter"], active=0) == merged
    assert _genai_ids(sep, [sep / "adapter.onnx_adapter"]) == _genai_ids(arts["base"]) != merged


def test_multi_lora(base, adapter, work):
    """Two adapters exported separate (a second one of rank 2 on the attention only): one .onnx_adapter each;
    onnxruntime-genai switches between them (each gives its own merged export's ids), our backend sums both by
    default (the export merging both) or runs the one given as adapter=."""
    from qwen_edge.export import export

    other = _make_adapter(base, work / "lora-attn", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    out = work / "multi"
    sep = export(base, "onnx", "fp32", out, name="sep", adapters=[adapter, other], adapter_mode="separate")
    files = [sep / "adapter-1.onnx_adapter", sep / "adapter-2.onnx_adapter"]
    assert [r["file"] for r in json.loads((sep / "manifest.json").read_text())["adapters"]] == [f.name for f in files]
    both = export(base, "onnx", "fp32", out, name="both", adapters=[adapter, other])
    only_other = export(base, "onnx", "fp32", out, name="other", adapters=[other])
    assert _ids(sep) == _ids(both)
    assert _ids(sep, adapter=str(files[1])) == _ids(only_other) != _ids(both)
    assert _genai_ids(sep, files, active=1) == _genai_ids(only_other)
    assert _genai_ids(sep, files, active=0) != _genai_ids(sep, files, active=1)


def test_int4_separate_exports_and_verifies(cli, base, adapter, work):
    """An int4 export with the adapter separate (LoRA branches in float beside MatMulNBits) passes
    `verify --reference BASE` (the reference: base + the recorded adapter, by PEFT), and its logits are those of
    transformers + PEFT within int4 noise, far closer than the same artifact without its adapter (a random tiny
    model's near-flat logits let verify's gates pass either way, so this is the check that the branch applies)."""
    r = cli("export", str(base), "--adapter", str(adapter), "--adapter-mode", "separate", "--format", "onnx",
            "--quant", "int4", "-o", str(work / "int4"), "--no-verify")
    assert r.returncode == 0, r.stderr
    (art,) = (work / "int4").iterdir()
    assert (art / "adapter.onnx_adapter").is_file()
    r = cli("verify", str(art), "--reference", str(base), "--quick", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["reference_adapters"] == [str(adapter)]
    want = _logits(base, adapters=[adapter])
    err = np.abs(_logits(art) - want).mean()
    assert err < 0.5 * np.abs(_logits(art, adapter_scale=0.0) - want).mean()


def test_bad_onnx_adapters_exit_2(cli, arts, work):
    """An adapter on a graph without LoRA inputs, a file that is not an .onnx_adapter, and one for another graph
    are one `error:` line each with exit 2."""
    args = ["--raw", "--prompt", "Hello", "--max-new-tokens", "2", "--threads", "2"]
    sep_file = arts["separate"] / "adapter.onnx_adapter"
    r = cli("generate", str(arts["base"]), "--adapter", str(sep_file), *args)
    assert r.returncode == 2 and "has no LoRA inputs" in r.stderr, r.stderr
    junk = work / "junk.onnx_adapter"
    junk.write_bytes(b"not an adapter")
    r = cli("generate", str(arts["separate"]), "--adapter", str(junk), *args)
    assert r.returncode == 2 and "not an onnxruntime LoRA adapter" in r.stderr, r.stderr
    from qwen_edge.formats.onnx_adapter import read_adapter_file, write_adapter_file

    other = work / "other.onnx_adapter"
    tensors = read_adapter_file(sep_file)
    write_adapter_file({k.replace("layers.0", "layers.9"): v for k, v in tensors.items()}, other)
    r = cli("generate", str(arts["separate"]), "--adapter", str(other), *args)
    assert r.returncode == 2 and "is not a LoRA input of this graph" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_recipe_onnx_separate(base, adapter, work, tmp_path):
    """A recipe with `format: onnx` and `adapter_mode: separate` passes validation and ships the .onnx_adapter."""
    from qwen_edge.recipes.recipe import load_recipe
    from qwen_edge.recipes.recipe_run import export_recipe

    y = tmp_path / "r.yaml"
    y.write_text(f"source: {base}\nformat: onnx\nquant: fp32\nadapter: {adapter}\nadapter_mode: separate\n")
    art = export_recipe(load_recipe(y), work / "recipe-out", verify=False).path
    assert (art / "adapter.onnx_adapter").is_file()
    assert json.loads((art / "manifest.json").read_text())["adapters"][0]["mode"] == "separate"


def test_separate_onnx_patterned_ranks_inside_fused_projections(base, work):
    """rsLoRA with q, k, v (one fused qkv input) at ranks 4, 2, 3 and gate, up (fused gate_up) at 4, 1, an alpha
    pattern on k: the separate ONNX export (graph LoRA inputs + .onnx_adapter) gives transformers + PEFT's logits and
    ids, as does the merged export; the base does not."""
    from qwen_edge.export import export
    from test_adapters import PEFT_ATOL

    lora = _make_adapter(base, work / "lora-fused-ranks", r=4, lora_alpha=8, use_rslora=True,
                         rank_pattern={"k_proj": 2, "v_proj": 3, "up_proj": 1}, alpha_pattern={"k_proj": 5})
    want, want_logits = _ids(base, adapters=[lora]), _logits(base, adapters=[lora])
    out = work / "arts-fused-ranks"
    sep = export(base, "onnx", "fp32", out, name="separate", adapters=[lora], adapter_mode="separate")
    merged = export(base, "onnx", "fp32", out, name="merged", adapters=[lora])
    rec = json.loads((sep / "manifest.json").read_text())["adapters"][0]
    assert rec["rank_pattern"] == {"k_proj": 2, "v_proj": 3, "up_proj": 1} and rec["mode"] == "separate"
    np.testing.assert_allclose(_logits(sep), want_logits, atol=PEFT_ATOL)
    np.testing.assert_allclose(_logits(merged), want_logits, atol=PEFT_ATOL)
    assert _ids(sep) == want and _ids(merged) == want
    assert float(np.abs(_logits(sep, adapter_scale=0.0) - want_logits).max()) > 20 * PEFT_ATOL
