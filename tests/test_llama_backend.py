"""llama.cpp backend: tokenizer agreement, fp16 parity with PyTorch, KV-cache rewind, context limits, bad files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_torch
from qwen_edge.errors import QwenEdgeError
from qwen_edge.formats.gguf import read_gguf
from runtime_contract import (artifact_facts, assert_cli_max_context_refused, assert_info_describes_artifact,
                              assert_max_context_bounded, assert_rewind_reuses_prefix)

pytest.importorskip("llama_cpp")

CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.json"
PROMPT = [9707, 11, 1879, 0, 151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def f16_qwen3(exported):
    return exported("tiny-qwen3", "gguf", "f16")


@pytest.fixture(scope="module")
def rt(f16_qwen3):
    from qwen_edge.backends import load

    r = load(f16_qwen3, max_context=512)
    yield r
    r.close()


def test_info_and_context_cap(f16_qwen3):
    from qwen_edge.backends import load

    with load(f16_qwen3, max_context=300, threads=1) as r:
        assert r.info.backend == "llama_cpp" and r.info.format == "gguf" and r.info.quant == "f16"
        assert r.info.context_length == 300 and r.info.threads == 1 and r.info.vocab_size == 151936
        r.prefill(list(range(100, 400)))
        with pytest.raises(QwenEdgeError, match="context full"):
            r.prefill([5])
    with load(f16_qwen3) as r:  # default: the target's max_context, never the model's full context
        assert r.info.context_length == min(4096, json.loads((f16_qwen3 / "manifest.json").read_text())
                                            ["context_length"])


def test_info_describes_the_artifact(rt, f16_qwen3):
    assert_info_describes_artifact(rt, *artifact_facts(f16_qwen3))


def test_max_context_beyond_the_artifact_is_an_error(f16_qwen3, cli):
    """No silent clamp: llama.cpp would accept any n_ctx, the backend refuses what the artifact does not support."""
    from qwen_edge.backends import load

    ctx, _ = artifact_facts(f16_qwen3)
    assert_max_context_bounded(load, f16_qwen3, ctx, threads=1)
    assert_cli_max_context_refused(cli, f16_qwen3, ctx)


def test_recorded_context_bounds_max_context(synth_ckpt, tmp_path):
    """An artifact exported with a shorter context records it in the manifest while the GGUF header keeps the model's
    trained maximum: the manifest's figure is the artifact's context length, and llama.cpp gets no more."""
    from qwen_edge.backends import load
    from qwen_edge.export import export

    art = export(synth_ckpt("tiny-qwen3"), "gguf", "f16", tmp_path, context_length=256)
    ctx, stops = artifact_facts(art)
    assert ctx == 256 and read_gguf(art / "model.gguf").arch_kv("context_length") > 256
    with load(art, threads=1) as r:  # the target's 4096 exceeds it: the default takes the artifact's 256
        assert_info_describes_artifact(r, ctx, stops)
        assert r.info.context_length == 256
    assert_max_context_bounded(load, art, ctx, threads=1)


@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-qwen3"])
def test_tokenizer_agrees_with_tokenizer_json(exported, arch):
    """llama.cpp's tokenizer (from the GGUF metadata) gives the artifact's tokenizer.json ids on the corpus.

    llama.cpp applies no NFC normalizer (tokenizer.json's first step), so a string that is not NFC agrees
    once normalized; every NFC string must agree exactly as it is.
    """
    from qwen_edge.backends import load
    from qwen_edge.text.tokenizer import Tokenizer

    art = exported(arch, "gguf", "q8_0")
    tok = Tokenizer.from_dir(art)
    corpus = json.loads(CORPUS.read_text(encoding="utf-8"))
    assert len(corpus) > 100
    special = ["<|im_start|>user\nhi<|im_end|>", "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n"
               "สวัสดี 你好<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok<|im_end|><|endoftext|>",
               "<tool_call>{\"a\": 1}</tool_call><|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>"]
    mismatches = []
    with load(art, max_context=256) as r:
        for s in corpus + special:
            want = tok.encode(s)
            nfc = unicodedata.normalize("NFC", s)
            got = r.native_tokenize(nfc)
            if got != want:
                mismatches.append((s[:60], want[:12], got[:12]))
        for s in special:
            assert 151644 in r.native_tokenize(s) or "<|im_start|>" not in s
    assert not mismatches, f"{len(mismatches)} strings differ, first: {mismatches[0]}"


@requires_torch
@pytest.mark.parametrize("arch", ["tiny-qwen2-untied", "tiny-qwen3"])
def test_f16_logits_match_pytorch(exported, synth_ckpt, arch):
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_edge.backends import load

    ref_model = AutoModelForCausalLM.from_pretrained(synth_ckpt(arch), dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor([PROMPT])).logits[0].numpy()
    with load(exported(arch, "gguf", "f16"), max_context=128) as r:
        got = r.prefill_all_logits(PROMPT)
        r.reset()
        r.prefill(PROMPT)
        last = r.logits()
    scale = float(np.abs(ref).max())
    assert np.abs(got - ref).max() <= 2e-3 * max(1.0, scale)  # fp16 weights, f32 compute
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    np.testing.assert_allclose(last, got[-1], atol=1e-4)


def test_rewind_reuses_the_cache(rt):
    assert_rewind_reuses_prefix(rt, PROMPT[:6], [3, 4, 5, 6, 7], [42, 43, 44], atol=1e-4)
    with pytest.raises(QwenEdgeError, match="cannot rewind"):
        rt.rewind(rt.n_cached + 1)


def test_prefill_in_chunks_and_all_logits_agree(f16_qwen3):
    from qwen_edge.backends import load

    ids = [int(x) for x in np.random.default_rng(0).integers(0, 150000, size=300)]
    with load(f16_qwen3, max_context=512, n_batch=64) as r:
        r.prefill(ids)
        chunked = r.logits()
        r.reset()
        full = r.prefill_all_logits(ids)
    assert full.shape == (300, 151936)
    np.testing.assert_allclose(chunked, full[-1], atol=1e-3)


def test_greedy_decode_is_deterministic(rt):
    def run():
        rt.reset()
        rt.prefill(PROMPT)
        out = []
        for _ in range(6):
            t = int(np.argmax(rt.logits()))
            out.append(t)
            rt.decode(t)
        return out

    assert run() == run()


def test_bad_ids_and_closed_runtime(f16_qwen3):
    from qwen_edge.backends import load

    r = load(f16_qwen3, max_context=64)
    with pytest.raises(QwenEdgeError, match="outside the vocabulary"):
        r.prefill([151936])
    with pytest.raises(QwenEdgeError, match="outside the vocabulary"):
        r.prefill([-1])
    r.close()
    r.close()  # idempotent
    with pytest.raises(QwenEdgeError, match="closed"):
        r.prefill([1])


def test_cuda_without_gpu_build_is_a_clear_error(f16_qwen3):
    import llama_cpp

    from qwen_edge.backends import load

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build offloads to GPU")
    with pytest.raises(QwenEdgeError, match="GPU"):
        load(f16_qwen3, device="cuda")


def test_bare_gguf_file_loads(f16_qwen3, tmp_path):
    from qwen_edge.backends import load

    p = tmp_path / "bare.gguf"
    shutil.copyfile(f16_qwen3 / "model.gguf", p)
    with load(p, max_context=64) as r:
        r.prefill(PROMPT)
        assert r.logits().shape == (151936,)
        assert r.info.quant == ""
        g = read_gguf(p)  # no manifest: the facts come from the GGUF header
        assert r.info.artifact_context_length == g.arch_kv("context_length")
        assert r.info.stop_ids and r.info.stop_ids[0] == g.kv["tokenizer.ggml.eos_token_id"]
    with pytest.raises(QwenEdgeError, match="check_hashes"):
        load(p, check_hashes=True)  # nothing to check a bare file against


def _rehash(root, rel):
    from qwen_edge.model.checkpoint import sha256_file

    m = json.loads((root / "manifest.json").read_text())
    for f in m["files"]:
        if f["path"] == rel:
            f["bytes"], f["sha256"] = (root / rel).stat().st_size, sha256_file(root / rel)
    (root / "manifest.json").write_text(json.dumps(m))


def test_load_checks_sizes_and_header_not_hashes(f16_qwen3, tmp_path, cli):
    """load() reads no weights: a same-size altered weight byte passes it (only the sha256 can tell), and
    load(check_hashes=True) and `inspect` catch it; a truncated model file fails load before llama.cpp sees it."""
    from qwen_edge.backends import load

    art = tmp_path / "art"
    shutil.copytree(f16_qwen3, art)
    model = art / "model.gguf"
    g = read_gguf(model)
    with open(model, "r+b") as f:  # one byte in the middle of the tensor data, same size
        f.seek((g.data_offset + g.size) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    with load(art, max_context=64) as r:
        r.prefill(PROMPT)
    with pytest.raises(QwenEdgeError, match="sha256"):
        load(art, max_context=64, check_hashes=True)
    r = cli("inspect", str(art))
    assert r.returncode == 2 and "sha256" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    with open(model, "r+b") as f:
        f.truncate(g.size - 4096)
    with pytest.raises(QwenEdgeError, match="manifest says"):  # the size in the manifest
        load(art, max_context=64)
    _rehash(art, "model.gguf")
    with pytest.raises(QwenEdgeError, match="truncated GGUF"):  # the header's tensor table, pure Python
        load(art, max_context=64)


_FUZZ = r"""
import json, sys, random
import numpy as np
from qwen_edge.errors import QwenEdgeError
from qwen_edge.backends import load
src, dst = sys.argv[1], sys.argv[2]
data = open(src, 'rb').read()
regions = [(0, 4096), (int(sys.argv[3]), int(sys.argv[5]))]
rng = random.Random(0)
for i in range(int(sys.argv[4])):
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        lo, hi = regions[rng.randrange(2)]
        b[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    open(dst, 'wb').write(bytes(b))
    out = {'i': i, 'error': None, 'type': None, 'logits': None}
    try:
        with load(dst, max_context=32) as r:
            r.prefill([1, 2])
            lg = np.asarray(r.logits())
            out['logits'] = [list(lg.shape), int(lg.size)]
    except Exception as e:  # the parent judges: only a QwenEdgeError with a one-line message is clean
        out['error'], out['type'] = str(e), type(e).__name__
    print(json.dumps(out), flush=True)
"""


def test_corrupt_headers_never_crash_the_process(exported, tmp_path):
    """Random bit flips in the header region: a QwenEdgeError or a working model, never a native crash.

    The child reports one JSON line per mutated file: `error` is None for a file that loaded and produced
    logits, else the exception's message, which must be a non-empty one-line QwenEdgeError message.
    """
    from qwen_edge.formats.gguf import read_gguf

    n = 60
    src = exported("tiny-qwen3", "gguf", "q8_0") / "model.gguf"
    g = read_gguf(src)
    res = subprocess.run([sys.executable, "-c", _FUZZ, str(src), str(tmp_path / "f.gguf"), str(g.table_offset),
                          str(n), str(g.data_offset)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"child died (exit {res.returncode}): {res.stderr[-2000:]}"
    outcomes = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert [o["i"] for o in outcomes] == list(range(n)), res.stdout[-2000:]
    errors = 0
    for o in outcomes:
        if o["error"] is None:
            assert o["type"] is None and o["logits"] is not None, o
            shape, size = o["logits"]
            assert size > 0 and shape[-1] == size, o  # one row of logits over the vocabulary
        else:
            errors += 1
            assert o["type"] == "QwenEdgeError", f"mutation {o['i']}: {o['type']}: {o['error']}"
            assert o["error"].strip() and "\n" not in o["error"], f"mutation {o['i']}: {o['error']!r}"
    assert errors > 0, "no mutation was rejected: the fuzzer does not reach the header checks"
