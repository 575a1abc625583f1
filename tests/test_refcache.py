"""verify's reference cache: a cached reference gives the uncached report; a bad entry is recomputed, never trusted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_torch
from qwen_edge.quality.verify import METRICS

pytestmark = requires_torch
TOL = dict(rel=1e-9, abs=1e-12)
"""Cached and uncached metrics: the cache holds the reference's float32 logits bit for bit, so they agree to the
last float64 rounding of the accumulator (the tolerance only guards a BLAS reordering between runs)."""


@pytest.fixture(scope="module")
def fid(tmp_path_factory):
    """(fidelity checkpoint, its GGUF q8_0 export in a module directory)."""
    from fidelity import fidelity_checkpoint
    from qwen_edge.export import export

    ckpt = fidelity_checkpoint()
    return ckpt, export(ckpt, "gguf", "q8_0", tmp_path_factory.mktemp("refcache_art"), name="fid-gguf-q8_0")


@pytest.fixture
def copy_entry(entry, tmp_path):
    """A copy of the entry's cache directory for a test to damage (removed after it)."""
    root = Path(shutil.copytree(entry[0], tmp_path / "cache"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def uncached(fid):
    from qwen_edge.quality.verify import verify

    return verify(fid[1], fid[0], quick=True, store=False, reference_cache=False)


@pytest.fixture(scope="module")
def entry(fid, tmp_path_factory):
    """A cache directory holding the fidelity checkpoint's quick-text entry, and the report that computed it."""
    from qwen_edge.quality.verify import verify

    root = tmp_path_factory.mktemp("refcache")
    art = Path(shutil.copytree(fid[1], tmp_path_factory.mktemp("refcache_computed") / "art"))
    yield root, verify(art, fid[0], quick=True, reference_cache=root), art
    shutil.rmtree(root, ignore_errors=True)  # 362 MB: pytest keeps the last sessions' temporary directories


def same_report(a, b):
    for k in METRICS + ("ppl_reference", "ppl_artifact"):
        assert a["metrics"][k] == pytest.approx(b["metrics"][k], **TOL), k
    for k in ("passed", "failed", "greedy_prefixes", "greedy_ties", "tokens_evaluated", "windows"):
        assert a[k] == b[k], k


def test_cached_reference_gives_the_uncached_report(fid, uncached, entry, tmp_path):
    from qwen_edge.model.artifact import Artifact
    from qwen_edge.quality.reference import MANIFEST_KEY
    from qwen_edge.quality.verify import render_report, verify

    root, computed, computed_art = entry
    assert computed["reference_cache"]["state"] == "computed" and not computed["reference_cache"]["used"]
    assert uncached["reference_cache"] == {"used": False, "key": None, "state": "off"}
    art = Path(shutil.copytree(fid[1], tmp_path / "art"))
    hit = verify(art, fid[0], quick=True, reference_cache=root)  # stores the parity and the on-device record
    assert hit["reference_cache"] == {"used": True, "key": computed["reference_cache"]["key"], "state": "hit"}
    assert hit["backends"]["reference"] == computed["backends"]["reference"] == "torch"
    same_report(hit, uncached)
    same_report(computed, uncached)
    assert "reference: cached entry " + hit["reference_cache"]["key"][:12] in render_report(hit)
    assert "cached entry" not in render_report(computed)
    manifest = Artifact.open(art).manifest
    assert manifest["parity"]["reference_cache"]["used"] is True
    # the on-device record made from the cached logits is the one the reference itself gave
    assert Artifact.open(computed_art).manifest[MANIFEST_KEY] == manifest[MANIFEST_KEY]


def _key(fid):
    """The cache key and window layout verify() computes for the fidelity checkpoint's quick text."""
    from qwen_edge.model.checkpoint import Checkpoint
    from qwen_edge.quality.refcache import reference_key
    from qwen_edge.quality.verify import GREEDY_TOKENS, WINDOW, load_eval_set
    from qwen_edge.text.tokenizer import Tokenizer

    ev = load_eval_set(Tokenizer.from_dir(fid[1]), quick=True)
    ck = Checkpoint(fid[0])
    try:
        sha = ck.weights_sha256
    finally:
        ck.close()
    key = reference_key(fid[0], sha, [], ev.sha256, True, ev.windows, ev.prompts, GREEDY_TOKENS, WINDOW)
    return key, [len(w) for w in ev.windows], len(ev.prompts)


def _flip_logit(npy: Path) -> None:
    """One float32 logit in the middle of the array made 1000 larger (a flipped sector, a bad copy)."""
    a = np.load(npy, mmap_mode="r+")
    a[a.shape[0] // 2, 7] += 1000.0
    a.flush()


def _edit_meta(field: str, value):
    def edit(meta_path: Path) -> None:
        meta = json.loads(meta_path.read_text())
        (meta["key"] if field in meta["key"] else meta)[field] = value
        meta_path.write_text(json.dumps(meta))
    return edit


@pytest.mark.parametrize("damage", ["flipped logit", "truncated", "no logits", "key echo", "greedy"])
def test_a_damaged_entry_is_not_used(fid, entry, copy_entry, damage):
    """Each check on read: the logits' sha256, their shape, the file pair, the key echo, the greedy runs."""
    from qwen_edge.quality.refcache import ReferenceCache, key_digest

    key, lengths, prompts = _key(fid)
    digest = key_digest(key)
    assert digest == entry[1]["reference_cache"]["key"]
    root = copy_entry
    lines: list[str] = []
    cache = ReferenceCache(root, log=lines.append)
    assert cache.load(key, lengths, prompts) is not None
    meta, npy = cache.paths(digest)
    {"flipped logit": lambda: _flip_logit(npy),
     "truncated": lambda: npy.write_bytes(npy.read_bytes()[:-4096]),
     "no logits": npy.unlink,
     "key echo": lambda: _edit_meta("transformers", "0.0")(meta),
     "greedy": lambda: _edit_meta("greedy", [[1, 2]] * prompts)(meta)}[damage]()
    assert cache.load(key, lengths, prompts) is None
    assert len(lines) == 1 and "unusable" in lines[0] and digest[:12] in lines[0]
    assert not meta.exists() and not npy.exists()  # dropped: the next verify replaces it


def test_a_corrupted_entry_is_recomputed_and_replaced(fid, uncached, entry, copy_entry):
    """A corrupted entry (one logit changed) never reaches the gate: verify recomputes the reference, reports the
    same metrics as without the cache, and stores a sound entry in its place."""
    from qwen_edge.quality.refcache import ReferenceCache
    from qwen_edge.quality.verify import verify

    key, lengths, prompts = _key(fid)
    root = copy_entry
    meta, npy = ReferenceCache(root).paths(entry[1]["reference_cache"]["key"])
    _flip_logit(npy)
    lines: list[str] = []
    report = verify(fid[1], fid[0], quick=True, store=False, reference_cache=root, log=lines.append)
    assert report["reference_cache"]["state"] == "computed"
    assert any("unusable" in line for line in lines) and any("stored entry" in line for line in lines)
    same_report(report, uncached)
    assert ReferenceCache(root).load(key, lengths, prompts) is not None


def test_verify_no_reference_cache_flag(monkeypatch):
    """`verify --no-reference-cache` reaches verify() as reference_cache=False, the default as True (the export
    flag is exercised end to end by the matrix test)."""
    import qwen_edge.quality.verify as v
    from qwen_edge.cli import main

    seen = []
    monkeypatch.setattr(v, "run_verify", lambda *a, **k: seen.append(k["reference_cache"]) or 0)
    assert main(["verify", "ART", "--no-reference-cache"]) == 0 and main(["verify", "ART"]) == 0
    assert seen == [False, True]


def test_accumulator_matches_a_per_position_computation_on_real_logits(fid, entry):
    """The chunked float64 accumulator against a plain per-position log-softmax computation, on the fidelity
    checkpoint's reference logits (from the cache entry) and its q8_0 artifact's (llama.cpp), one window; and the
    compact record built from the accumulator's log-sum-exp is the one the recorder computes alone."""
    from qwen_edge.backends import load
    from qwen_edge.quality.reference import ReferenceRecorder
    from qwen_edge.quality.verify import Accumulator

    from qwen_edge.quality.refcache import ReferenceCache
    from qwen_edge.quality.verify import load_eval_set
    from qwen_edge.text.tokenizer import Tokenizer

    cached = ReferenceCache(entry[0]).load(*_key(fid))
    ids = load_eval_set(Tokenizer.from_dir(fid[1]), quick=True).windows[0]
    ref = np.array(cached.window(0))
    rt = load(fid[1], max_context=len(ids) + 8)
    try:
        art = np.array(rt.prefill_all_logits(ids))
    finally:
        rt.close()
    acc = Accumulator()
    acc.add(ids, ref, art)
    m = acc.metrics()
    kl, nll_r, nll_a, err = [], 0.0, 0.0, []
    for i in range(len(ids)):
        r, a = ref[i].astype(np.float64), art[i].astype(np.float64)
        lp = r - (r.max() + np.log(np.exp(r - r.max()).sum()))
        lq = a - (a.max() + np.log(np.exp(a - a.max()).sum()))
        kl.append(max(float((np.exp(lp) * (lp - lq)).sum()), 0.0))
        err.append(np.abs(r - a))
        if i + 1 < len(ids):
            nll_r, nll_a = nll_r - lp[ids[i + 1]], nll_a - lq[ids[i + 1]]
    assert m["kl_mean"] == pytest.approx(np.mean(kl), rel=1e-9) and m["kl_mean"] > 1e-6
    assert m["kl_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-9)
    assert m["max_abs_logit_error"] == np.max(err) and m["mean_abs_logit_error"] == pytest.approx(np.mean(err), rel=1e-9)
    assert m["ppl_reference"] == pytest.approx(np.exp(nll_r / (len(ids) - 1)), rel=1e-9)
    assert m["ppl_artifact"] == pytest.approx(np.exp(nll_a / (len(ids) - 1)), rel=1e-9)
    assert m["top1_agreement"] == np.mean(ref.argmax(1) == art.argmax(1))
    alone, shared = ReferenceRecorder(), ReferenceRecorder()
    alone.add_window(ids, ref)
    shared.add_window(ids, ref, lse=acc.lse_ref)
    assert alone.record("x", True, 0) == shared.record("x", True, 0)


def test_export_matrix_verifies_every_pair_against_one_reference(fid, cli, tmp_path):
    """`export SRC --format gguf,onnx --quant q8_0,int4 --no-reference-cache`: the two pairs the exporters know,
    the reference computed once (the second verify reads it from the matrix's temporary cache; the user's cache is
    neither read nor written), one table, exit 1 naming only the artifact that failed (a KL gate of 1e-3 between the
    q8_0's and the int4's KL on this checkpoint)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    r = cli("export", str(fid[0]), "--format", "gguf,onnx", "--quant", "q8_0,int4", "-o", str(tmp_path / "out"),
            "--set", "verify.quick=true", "--set", "verify.thresholds.kl_mean=0.001", "--no-reference-cache",
            env={"QWEN_EDGE_REFERENCE_CACHE": str(cache)})
    assert r.returncode == 1, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows[0][:5] == ["artifact", "format", "quant", "size", "verify"]
    assert [(row[1], row[2], row[5], row[8]) for row in rows[1:3]] == [
        ("gguf", "q8_0", "passed", "computed"), ("onnx", "int4", "FAILED", "cached")]
    assert rows[3] == ["2", "artifacts,", "1", "FAILED"]
    err = [line for line in r.stderr.splitlines() if line.startswith("failed:")]
    assert len(err) == 1 and "onnx-int4 (int4): kl_mean" in err[0] and "q8_0" not in err[0]
    assert not any(cache.iterdir())


def test_export_matrix_bad_pair_is_bad_input(fid, cli, tmp_path):
    r = cli("export", str(fid[0]), "--format", "gguf", "--quant", "q8_0,int4", "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: --quant int4: not a quantization of gguf"
    assert not (tmp_path / "out").exists()
    r = cli("export", str(fid[0]), "--format", "gguf,tflite", "--quant", "q8_0", "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "expected gguf, onnx or a comma list" in r.stderr


def test_batched_greedy_agreement_is_the_stepwise_one(fid, entry):
    """The artifact's greedy agreement from one prefill equals the token-by-token one (llama.cpp, the fidelity q8_0
    artifact, the reference's quick-text continuations), also when the reference run is made to diverge at a clear
    step or at a near-tie."""
    from qwen_edge.backends import load
    from qwen_edge.quality.refcache import ReferenceCache
    from qwen_edge.quality.verify import greedy_agreement, greedy_agreement_batched, load_eval_set
    from qwen_edge.text.tokenizer import Tokenizer

    cached = ReferenceCache(entry[0]).load(*_key(fid))
    prompts = load_eval_set(Tokenizer.from_dir(fid[1]), quick=True).prompts
    rt = load(fid[1], max_context=256)
    try:
        seen = []
        for p, g, m in zip(prompts, cached.greedy, cached.margins):
            wrong = list(g)
            wrong[5] = (wrong[5] + 1) % 1000  # the reference "chose" another token at step 5
            for tokens, margins in ((g, m), (wrong, m), (wrong, m[:5] + [0.0] + m[6:])):
                seen.append(greedy_agreement_batched(rt, p, tokens, margins))
                assert seen[-1] == greedy_agreement(rt, p, tokens, margins)
    finally:
        rt.close()
    assert seen[0][0] == 32 and seen[1][0] == 5 and seen[2][0] > 5 and seen[2][1] > seen[1][1]


def test_the_cache_keeps_under_its_size_limit_dropping_the_least_recently_used(tmp_path, monkeypatch):
    """Three 1 MiB entries under a 2.5 MiB limit: storing the third removes the least recently used one, and a hit
    counts as a use (the older entry that was just read survives)."""
    import os

    from qwen_edge.quality.refcache import MAX_ENV, ReferenceCache, key_digest

    monkeypatch.setenv(MAX_ENV, str(2.5 / 1024))
    cache = ReferenceCache(tmp_path)
    keys = [{"n": i, "greedy_tokens": 2} for i in range(3)]

    def store(key, t):
        w = cache.writer(key, [256])
        w.add_window(np.full((256, 1024), float(key["n"]), dtype=np.float32))
        assert w.commit([[1, 2]], [[0.5, 0.5]], "torch")
        os.utime(cache.paths(key_digest(key))[0], (t, t))

    store(keys[0], 1000)
    store(keys[1], 2000)
    assert cache.load(keys[0], [256], 1) is not None  # a hit: keys[0] is now the most recently used
    store(keys[2], 3000)
    present = {k["n"] for k in keys if cache.paths(key_digest(k))[0].exists()}
    assert present == {0, 2}
    assert not cache.paths(key_digest(keys[1]))[1].exists()
    monkeypatch.setenv(MAX_ENV, "0")  # no limit
    store(keys[1], 4000)
    assert all(cache.paths(key_digest(k))[0].exists() for k in keys)
