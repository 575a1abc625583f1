"""LoRA adapters from PEFT to the device: merged at export (GGUF and ONNX) or shipped beside a GGUF for llama.cpp.

Each adapter is made here with PEFT on a tiny checkpoint, with non-zero B (init_lora_weights=False), so the adapted
model's outputs differ from the base's. The reference is transformers + PEFT's merged model; the merged GGUF f32
and ONNX fp32 exports give its greedy ids, the separate llama.cpp LoRA GGUF gives the merged export's ids (through
our backend and through llama-cpp-python on its own), the base export does not, and every kind of bad adapter is
one `error:` line with exit 2.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import has_module, requires_torch

import qwen_edge
from qwen_edge.runtime.generate import generate
from qwen_edge.runtime.sampling import Sampling

pytestmark = [requires_torch, pytest.mark.skipif(not has_module("peft"), reason="needs peft (the [verify] extra)")]

ARCH = "tiny-qwen3"
PROMPT = [9707, 11, 1879, 0, 358, 1079, 1052, 525]
NEW = 16
SAMPLING = Sampling(repetition_penalty=50.0)
"""Greedy; the strong penalty (the same on every backend) forbids repeats, so each step reads deeper into the
ranking of a random model's near-flat logits and the paths discriminate (as in test_cross_backend)."""
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _make_adapter(base, out, **lora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(init_lora_weights=False, **{"target_modules": PROJECTIONS, **lora})
    peft_model = get_peft_model(model, cfg)
    b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert float(b.detach().abs().sum()) > 0  # non-zero B: the adapter changes the outputs
    peft_model.save_pretrained(str(out))
    return out


def _ids(path, **options):
    with qwen_edge.load(path, max_context=128, threads=2, **options) as rt:
        return generate(rt, PROMPT, sampling=SAMPLING, max_new_tokens=NEW, stop_ids=[]).output_ids


def _logits(path, **options):
    with qwen_edge.load(path, max_context=128, threads=2, **options) as rt:
        rt.prefill(PROMPT)
        return rt.logits().copy()


@pytest.fixture(scope="module")
def base(synth_ckpt):
    return synth_ckpt(ARCH)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def adapter(base, work):
    """Plain LoRA: rank 4, alpha 8 on every projection."""
    return _make_adapter(base, work / "lora", r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def patterned(base, work):
    """rsLoRA with a rank pattern and an alpha pattern: per-module scales llama.cpp's one alpha cannot state."""
    return _make_adapter(base, work / "lora-rs", r=4, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 2},
                         alpha_pattern={"o_proj": 3})


@pytest.fixture(scope="module")
def reference(base, adapter):
    return _ids(base, adapters=[adapter])


@pytest.fixture(scope="module")
def arts(base, adapter, work):
    from qwen_edge.export import export

    out = work / "arts"
    return {
        "gguf": export(base, "gguf", "f32", out, name="merged-gguf", adapters=[adapter]),
        "onnx": export(base, "onnx", "fp32", out, name="merged-onnx", adapters=[adapter]),
        "separate": export(base, "gguf", "f32", out, name="separate", adapters=[adapter], adapter_mode="separate"),
        "base": export(base, "gguf", "f32", out, name="base"),
    }


def test_merged_exports_match_peft_merged(cli, base, adapter, work, reference, arts):
    """GGUF f32 (through the CLI) and ONNX fp32 with the adapter merged give transformers + PEFT's greedy ids; the
    base export's differ."""
    r = cli("export", str(base), "--adapter", str(adapter), "--format", "gguf", "--quant", "f32", "-o",
            str(work / "cli"), "--no-verify")
    assert r.returncode == 0, r.stderr
    (cli_art,) = (work / "cli").iterdir()
    assert _ids(cli_art) == reference
    assert _ids(arts["onnx"]) == reference
    assert _ids(arts["gguf"]) == reference
    assert _ids(arts["base"]) != reference
    assert _ids(arts["base"]) == _ids(base)


def test_manifest_records_the_adapter(adapter, arts):
    from qwen_edge.model.adapters import adapter_sha256

    m = json.loads((arts["gguf"] / "manifest.json").read_text())
    (rec,) = m["adapters"]
    assert rec["source"] == str(adapter) and rec["sha256"] == adapter_sha256(adapter)
    assert (rec["rank"], rec["alpha"], rec["use_rslora"], rec["mode"]) == (4, 8.0, False, "merge")
    assert rec["targets"] == PROJECTIONS and rec["modules"] == 7 * 2
    s = json.loads((arts["separate"] / "manifest.json").read_text())["adapters"][0]
    assert (s["mode"], s["file"], s["scale_in_lora_b"]) == ("separate", "adapter.gguf", False)
    assert "adapters" not in json.loads((arts["base"] / "manifest.json").read_text())
    from qwen_edge.cli.inspect import inspect, render_inspect

    info = inspect(arts["separate"])
    assert info["adapters"] == [s]
    assert f"{adapter} · LoRA r4 alpha 8.0 · {','.join(PROJECTIONS)} · separate adapter.gguf" in render_inspect(info)


def test_separate_lora_gguf_matches_merged(arts, reference):
    """The llama.cpp LoRA GGUF beside the unmodified base: our backend applies it (artifact's own, or given as
    adapter=) and gives the merged export's ids; scale 0 gives the base's."""
    from qwen_edge.formats.gguf import check_gguf_file

    sep = arts["separate"]
    g = check_gguf_file(sep / "adapter.gguf")
    assert (g.kv["general.type"], g.kv["adapter.type"], g.kv["adapter.lora.alpha"]) == ("adapter", "lora", 8.0)
    names = {t.name for t in g.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    assert (sep / "model.gguf").read_bytes() == (arts["base"] / "model.gguf").read_bytes()  # the base, unmodified
    merged = _ids(arts["gguf"])
    assert merged == reference
    assert _ids(sep) == merged
    assert _ids(arts["base"], adapter=str(sep / "adapter.gguf")) == merged
    assert _ids(sep, adapter_scale=0.0) == _ids(arts["base"])
    np.testing.assert_allclose(_logits(sep), _logits(arts["gguf"]), atol=2e-3)


def test_llama_cpp_python_loads_the_pair(arts):
    """llama-cpp-python on its own (Llama(model_path, lora_path)) gives the merged export's logits and greedy ids."""
    from llama_cpp import Llama

    sep = arts["separate"]
    want = _logits(arts["gguf"])

    def run(**kw):
        llm = Llama(model_path=str(sep / "model.gguf"), n_ctx=128, n_threads=2, logits_all=True, verbose=False,
                    **kw)
        try:
            llm.eval(PROMPT)
            logits = np.array(llm.scores[len(PROMPT) - 1], dtype=np.float32)
            llm.reset()
            ids = []
            for t in llm.generate(PROMPT, top_k=1, temp=0.0, repeat_penalty=1.0):
                ids.append(t)
                if len(ids) == 6:
                    break
            return logits, ids
        finally:
            llm.close()

    logits, ids = run(lora_path=str(sep / "adapter.gguf"))
    np.testing.assert_allclose(logits, want, atol=2e-3)
    with qwen_edge.load(arts["gguf"], max_context=128, threads=2) as rt:
        merged = generate(rt, PROMPT, sampling=Sampling(), max_new_tokens=6, stop_ids=[]).output_ids
    assert ids == merged
    base_logits, _ = run()
    assert np.abs(base_logits - want).max() > 0.1  # without the adapter it is the base


PEFT_ATOL = 2e-3
"""Logits of an f32/fp32 export with an adapter against transformers + PEFT's (float32 on both sides)."""


def test_patterned_adapter(base, patterned, work):
    """rsLoRA + rank/alpha patterns: merged and separate (scale folded into lora_b) both give PEFT's logits and ids.
    Negative controls: the same tensors read without rsLoRA, or without the alpha pattern, give logits far outside
    that tolerance (so a reader ignoring either could not pass); the rank pattern stated the other way round (r 2,
    every other module 4) gives the same logits."""
    from qwen_edge.export import export

    want, want_logits = _ids(base, adapters=[patterned]), _logits(base, adapters=[patterned])
    merged = export(base, "gguf", "f32", work / "arts-rs", name="merged", adapters=[patterned])
    sep = export(base, "gguf", "f32", work / "arts-rs", name="sep", adapters=[patterned], adapter_mode="separate")
    rec = json.loads((sep / "manifest.json").read_text())["adapters"][0]
    assert rec["use_rslora"] and rec["scale_in_lora_b"] and rec["rank_pattern"] == {"down_proj": 2}
    np.testing.assert_allclose(_logits(merged), want_logits, atol=PEFT_ATOL)
    np.testing.assert_allclose(_logits(sep), want_logits, atol=PEFT_ATOL)
    assert _ids(merged) == want
    assert _ids(sep) == want
    others = {p: 4 for p in PROJECTIONS if p != "down_proj"}
    for name, edit, same in (("no-rslora", {"use_rslora": False}, False),
                             ("no-alpha-pattern", {"alpha_pattern": {}}, False),
                             ("rank-other-way", {"r": 2, "rank_pattern": others}, True)):
        ctl = export(base, "gguf", "f32", work / "arts-rs", name=name,
                     adapters=[_bad(work, patterned, name, edit_config=edit)])
        err = float(np.abs(_logits(ctl) - want_logits).max())
        assert (err <= PEFT_ATOL) if same else (err > 20 * PEFT_ATOL), (name, err)


def test_verify_uses_base_plus_adapter(cli, base, adapter, arts, work):
    """verify --reference BASE applies the recorded adapter with PEFT: the merged export passes; an artifact whose
    manifest names the adapter but whose weights lack it fails (exit 1)."""
    r = cli("verify", str(arts["gguf"]), "--reference", str(base), "--quick", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["reference_adapters"] == [str(adapter)]
    broken = work / "not-applied"
    shutil.copytree(arts["base"], broken)
    from qwen_edge.model.artifact import Artifact

    Artifact.open(broken).update_manifest(
        adapters=json.loads((arts["gguf"] / "manifest.json").read_text())["adapters"])
    r = cli("verify", str(broken), "--reference", str(base), "--quick")
    assert r.returncode == 1, r.stderr


def _bad(work, adapter, name, edit_config=None, tensors=None, drop=None):
    d = work / "bad" / name
    shutil.copytree(adapter, d)
    if edit_config:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(edit_config)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        from safetensors.numpy import save_file

        save_file(tensors, str(d / "adapter_model.safetensors"))
    if drop:
        (d / drop).unlink()
    return d


def _adapter_tensors(adapter):
    from safetensors.numpy import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def test_bad_adapters_exit_2(cli, base, adapter, work):
    t = _adapter_tensors(adapter)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    other_base = dict(t)
    other_base[f"{q}.lora_A.weight"] = np.zeros((4, 256), np.float32)  # hidden 256: made for another base
    unknown = dict(t)
    unknown["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = t[f"{q}.lora_A.weight"]
    unknown["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = t[f"{q}.lora_B.weight"]
    head = dict(t)
    head["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 64), np.float32)
    head["base_model.model.lm_head.lora_B.weight"] = np.zeros((151936, 4), np.float32)
    rank = dict(t)
    rank[f"{q}.lora_B.weight"] = np.zeros((128, 3), np.float32)
    cases = {
        "rank in config": (_bad(work, adapter, "rank", edit_config={"r": 8}), "rank mismatch"),
        "rank A vs B": (_bad(work, adapter, "rank-ab", tensors=rank), "rank mismatch"),
        "unknown layer": (_bad(work, adapter, "layer", tensors=unknown), "unknown module"),
        "lm_head": (_bad(work, adapter, "head", tensors=head), "unknown module"),
        "other base": (_bad(work, adapter, "other", tensors=other_base), "another base"),
        "other base id": (_bad(work, adapter, "other-id",
                               edit_config={"base_model_name_or_path": "Qwen/Qwen2.5-7B"}), None),
        "dora": (_bad(work, adapter, "dora", edit_config={"use_dora": True}), "DoRA"),
        "ia3": (_bad(work, adapter, "ia3", edit_config={"peft_type": "IA3"}), "not a LoRA adapter"),
        "no weights": (_bad(work, adapter, "noweights", drop="adapter_model.safetensors"), "no adapter_model"),
        "no config": (_bad(work, adapter, "noconfig", drop="adapter_config.json"), "not a PEFT adapter"),
    }
    for case, (path, needle) in cases.items():
        r = cli("export", str(base), "--adapter", str(path), "--format", "gguf", "--quant", "f32", "-o",
                str(work / "bad-out"), "--no-verify")
        if needle is None:  # a local base has no hub id to compare with: the adapter applies
            assert r.returncode == 0, (case, r.stderr)
            continue
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (case, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (case, r.stderr)
        assert "Traceback" not in r.stderr
    from qwen_edge.errors import QwenEdgeError
    from qwen_edge.export import export

    with pytest.raises(QwenEdgeError, match="adapter mode 'fold'"):
        export(base, "onnx", "fp32", work / "bad-out", adapters=[adapter], adapter_mode="fold")


def test_adapter_for_another_hub_base(base, adapter, work):
    """A hub source whose id differs from the adapter's base_model_name_or_path is refused."""
    from qwen_edge.model.adapters import read_adapter
    from qwen_edge.model.checkpoint import Checkpoint
    from qwen_edge.errors import QwenEdgeError

    d = _bad(work, adapter, "hub-base", edit_config={"base_model_name_or_path": "Qwen/Qwen3-0.6B"})
    ad = read_adapter(d)
    ckpt = Checkpoint(base)
    try:
        with pytest.raises(QwenEdgeError, match="another base"):
            ad.bind(ckpt.arch, "Qwen/Qwen3-1.7B")
        ad.bind(ckpt.arch, "qwen/qwen3-0.6b")
    finally:
        ckpt.close()
        ad.close()


def test_recipe_adapter_key_and_rebuild(base, adapter, work, tmp_path):
    """A recipe's `adapter` (one path or a list) reaches the export; an adapter changed in place rebuilds it."""
    from safetensors.numpy import save_file

    from qwen_edge.recipes.recipe import load_recipe
    from qwen_edge.recipes.recipe_run import export_recipe

    mine = _bad(work, adapter, "changed")
    y = tmp_path / "r.yaml"
    y.write_text(f"source: {base}\nformat: gguf\nquant: f32\nadapter: {mine}\n")
    recipe = load_recipe(y)
    assert recipe.adapter == [str(mine)] and recipe.adapter_mode == "merge"
    out = work / "recipe-out"
    first = export_recipe(recipe, out, verify=False)
    assert json.loads((first.path / "manifest.json").read_text())["adapters"][0]["source"] == str(mine)
    assert export_recipe(recipe, out, verify=False).skipped
    save_file({k: v * 2 for k, v in _adapter_tensors(mine).items()}, str(mine / "adapter_model.safetensors"))
    assert not export_recipe(recipe, out, verify=False).skipped


def test_generate_cli_adapter_flag(cli, arts):
    """`generate --adapter LORA_GGUF` on the bare base artifact gives the merged export's ids."""
    args = ["--raw", "--prompt", "Hello, world", "--max-new-tokens", "8", "--json", "--threads", "2"]
    r = cli("generate", str(arts["base"]), "--adapter", str(arts["separate"] / "adapter.gguf"), *args)
    assert r.returncode == 0, r.stderr
    merged = cli("generate", str(arts["gguf"]), *args)
    assert json.loads(r.stdout)["output_ids"] == json.loads(merged.stdout)["output_ids"]
    plain = cli("generate", str(arts["base"]), *args)
    assert json.loads(plain.stdout)["output_ids"] != json.loads(merged.stdout)["output_ids"]


def test_adapter_from_the_hub_cache(cli, base, adapter, tmp_path):
    """An adapter given as a hub id resolves through the Hugging Face cache (offline here), like a checkpoint: the
    manifest records its id and commit, and verify finds it again at that commit."""
    import hashlib

    from test_hub import add_snapshot

    home = tmp_path / "hf-home"
    commit = hashlib.sha1(b"qwen-edge test lora").hexdigest()
    add_snapshot(home / "hub", "qwen-edge-test/tiny-lora", adapter, commit, refs=("main",))
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1"}
    r = cli("export", str(base), "--adapter", "qwen-edge-test/tiny-lora", "--format", "gguf", "--quant", "f32",
            "-o", str(tmp_path / "out"), "--name", "hub", "--no-verify", env=env)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "out" / "hub" / "manifest.json").read_text())["adapters"][0]
    assert (rec["source"], rec["hub_id"], rec["commit"]) == ("qwen-edge-test/tiny-lora", "qwen-edge-test/tiny-lora",
                                                             commit)
    r = cli("verify", str(tmp_path / "out" / "hub"), "--reference", str(base), "--quick", "--json", env=env)
    assert r.returncode == 0, r.stderr
    (ref_adapter,) = json.loads(r.stdout)["reference_adapters"]
    assert ref_adapter.endswith(f"snapshots/{commit}")
    r = cli("export", str(base), "--adapter", "qwen-edge-test/no-such-lora", "--format", "gguf", "--quant", "f32",
            "-o", str(tmp_path / "out"), "--no-verify", env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
