"""Constrained decoding cost (issue 19): per-token mask cost over Qwen's 151,936-token vocabulary for the candidate
engines (llguidance, xgrammar, outlines-core) with JSON Schema coverage, and decode tok/s with and without a schema
through qwen-edge's one decode loop on real artifacts.

    python benchmarks/bench_constrained.py --tokenizer /tmp/shared/ck05 [--artifact DIR ...] [--gen-tokens 64]

Engines not installed are reported as absent (xgrammar pulls in torch, transformers and triton; install it beside,
`pip install --no-deps --target DIR xgrammar apache-tvm-ffi`, and put DIR on PYTHONPATH). Every engine gets the same
schema, the same token sequence (the tokenizer's own encoding of a valid instance) and writes the same int32 bitmask;
steps alternate between engines so a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from _record import write_record

N_VOCAB = 151936
STOP = [151645, 151643]

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"], "additionalProperties": False},
    "score": {"type": "number"}, "member": {"type": "boolean"}},
    "required": ["name", "age", "email", "tags", "address", "member"], "additionalProperties": False}
INSTANCE = {"name": "Ada Lovelace, the first programmer", "age": 36, "email": "ada@math.com",
            "tags": ["math", "poetry", "engines"], "address": {"city": "London", "zip": "W1"}, "score": 9.75,
            "member": True}

# JSON Schema features apps use (OpenAI structured outputs, function parameters): (schema, a valid instance, an
# instance the feature forbids). An engine covers a feature when it compiles the schema, takes every token of the valid
# instance and then allows the stop id, and refuses some token of the invalid one (or the stop id after it).
COVERAGE: dict[str, tuple[dict[str, Any], Any, Any]] = {
    "enum/const": ({"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"const": 3}},
                    "required": ["a", "b"], "additionalProperties": False}, {"a": "x", "b": 3}, {"a": "x", "b": 4}),
    "anyOf": ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, 12, True),
    "oneOf": ({"oneOf": [{"type": "string", "maxLength": 2}, {"type": "integer"}]}, "ab", "abc"),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"properties": {"a": {"maximum": 5}}}]}, {"a": 3}, {"a": 7}),
    "$ref/$defs": ({"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                                    "additionalProperties": False}},
                    "type": "array", "items": {"$ref": "#/$defs/p"}}, [{"x": 1}], [{"x": "1"}]),
    "recursive $ref": ({"$defs": {"n": {"type": "object", "properties": {"k": {"type": "array",
                                                                              "items": {"$ref": "#/$defs/n"}}},
                                        "required": ["k"], "additionalProperties": False}}, "$ref": "#/$defs/n"},
                       {"k": [{"k": [{"k": [{"k": [{"k": []}]}]}]}]}, {"k": [{"k": [{"k": [{"k": [{}]}]}]}]}),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, "AB-123", "AB-12x"),
    "format date-time": ({"type": "string", "format": "date-time"}, "2026-11-30T20:00:00Z", "2026-13-30T20:00:00Z"),
    "min/maxLength": ({"type": "string", "minLength": 2, "maxLength": 5}, "abc", "abcdefg"),
    "min/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}, [1, 2],
                     [1, 2, 3, 4]),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
                    ["a", 1], ["a", "b"]),
    "number bounds": ({"type": "number", "minimum": 0.5, "exclusiveMaximum": 10}, 9.5, 10.5),
    "integer bounds": ({"type": "integer", "minimum": -5, "maximum": 300}, 299, 301),
    "additionalProperties schema": ({"type": "object", "additionalProperties": {"type": "integer"}}, {"q": 1},
                                    {"q": "1"}),
    "type list / nullable": ({"type": ["string", "null"]}, None, 1),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                  "required": ["b"]}, {"b": "x"}, {"a": 1}),
}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


class Engine:
    """One engine's tokenizer setup, grammar compile, and per-token (mask into an int32 bitmask, accept) steps."""

    name = ""

    def setup(self, tokenizer: Any) -> None: ...

    def compile(self, schema: dict[str, Any]) -> Any: ...

    def matcher(self, compiled: Any) -> Any: ...

    def mask(self, m: Any, bitmask: np.ndarray) -> None: ...

    def accept(self, m: Any, token: int) -> None: ...


class Llguidance(Engine):
    name = "llguidance"

    def setup(self, tokenizer: Any) -> None:
        import llguidance

        self.llg = llguidance
        self.version = _version("llguidance")
        self.tok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=N_VOCAB, eos_token=STOP)

    def compile(self, schema: dict[str, Any]) -> Any:
        g = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False,
                                                                           "item_separator": ", ",
                                                                           "key_separator": ": "})
        err = self.llg.LLMatcher.validate_grammar(g, self.tok)
        if err:
            raise ValueError(err)
        return g

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tok, compiled, log_level=0)

    def mask(self, m: Any, bitmask: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

    def accept(self, m: Any, token: int) -> None:
        assert m.consume_token(token), m.get_error()


class Xgrammar(Engine):
    name = "xgrammar"

    def setup(self, tokenizer: Any) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.version = _version("xgrammar")
        vocab = [tokenizer.id_to_token(i) or "" for i in range(N_VOCAB)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.BYTE_LEVEL, vocab_size=N_VOCAB, stop_token_ids=STOP)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m: Any, bitmask: np.ndarray) -> None:
        import torch

        m.fill_next_token_bitmask(torch.from_numpy(bitmask.reshape(1, -1)))

    def accept(self, m: Any, token: int) -> None:
        assert m.accept_token(token)


class OutlinesCore(Engine):
    name = "outlines-core"

    def setup(self, tokenizer: Any) -> None:
        import outlines_core

        self.oc = outlines_core
        self.version = _version("outlines-core")
        vocab: dict[bytes, list[int]] = {}
        for i in range(tokenizer.vocab_size):
            if i in STOP or tokenizer.is_special(i):
                continue
            vocab.setdefault(tokenizer.token_bytes(i), []).append(i)
        self.vocab = outlines_core.Vocabulary(STOP[0], vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern=" ?")  # room for ", " and ": "
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def mask(self, m: Any, bitmask: np.ndarray) -> None:
        m.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

    def accept(self, m: Any, token: int) -> None:
        m.advance(token)


ENGINES: list[Callable[[], Engine]] = [Llguidance, Xgrammar, OutlinesCore]


def _takes(e: Engine, tokenizer: Any, compiled: Any, value: Any) -> bool:
    """Whether the engine takes every token of `value` (as json.dumps spells it) and then allows the stop id."""
    m = e.matcher(compiled)
    bitmask = np.zeros((N_VOCAB + 31) // 32, dtype=np.int32)
    for tok in [*tokenizer.encode(json.dumps(value)), STOP[0]]:
        e.mask(m, bitmask)
        if not (bitmask[tok // 32] >> (tok % 32)) & 1:
            return False
        if tok != STOP[0]:
            e.accept(m, tok)
    return True


def covers(e: Engine, tokenizer: Any, schema: dict[str, Any], good: Any, bad: Any) -> bool:
    try:
        compiled = e.compile(schema)
        return _takes(e, tokenizer, compiled, good) and not _takes(e, tokenizer, compiled, bad)
    except Exception:  # noqa: BLE001 - a refusal to compile, or an error on the way, is not covered
        return False


def mask_costs(tokenizer: Any, repeats: int) -> dict[str, Any]:
    text = json.dumps(INSTANCE)  # ", " and ": ": the spelling every engine is told to produce
    ids = tokenizer.encode(text)
    engines: list[Engine] = []
    out: dict[str, Any] = {}
    for make in ENGINES:
        e = make()
        t0 = time.perf_counter()
        try:
            e.setup(tokenizer)
        except ImportError as err:
            out[e.name] = {"installed": False, "error": str(err).splitlines()[0]}
            continue
        setup_s = time.perf_counter() - t0
        coverage = {feature: covers(e, tokenizer, *case) for feature, case in COVERAGE.items()}
        t0 = time.perf_counter()
        compiled = e.compile(SCHEMA)
        compile_s = time.perf_counter() - t0
        out[e.name] = {"installed": True, "version": e.version, "tokenizer_setup_s": setup_s,
                       "compile_s": compile_s, "coverage": coverage, "step_us": []}
        e.compiled = compiled  # type: ignore[attr-defined]
        engines.append(e)
    bitmask = np.zeros((N_VOCAB + 31) // 32, dtype=np.int32)
    for _ in range(repeats):
        live = {e.name: e.matcher(e.compiled) for e in engines}  # type: ignore[attr-defined]
        for tok in ids:
            for e in engines:  # alternate engines per token
                m = live[e.name]
                t0 = time.perf_counter()
                e.mask(m, bitmask)
                dt = time.perf_counter() - t0
                bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")
                assert bits[tok], f"{e.name} refuses token {tok} of a valid instance"
                out[e.name]["step_us"].append(dt * 1e6)
                e.accept(m, tok)
    for e in engines:
        steps = out[e.name].pop("step_us")
        out[e.name]["mask_us"] = {"median": statistics.median(steps), "p90": float(np.percentile(steps, 90)),
                                  "max": max(steps), "n": len(steps)}
        out[e.name]["coverage_count"] = sum(out[e.name]["coverage"].values())
    # what qwen-edge adds around llguidance per token: the bitmask unpacked and applied to float32 logits
    logits = np.random.default_rng(0).standard_normal(N_VOCAB).astype(np.float32)
    apply = []
    for _ in range(200):
        t0 = time.perf_counter()
        allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:N_VOCAB].astype(bool)
        np.where(allowed, logits, np.float32(-np.inf))
        apply.append((time.perf_counter() - t0) * 1e6)
    out["apply_mask_to_logits_us"] = statistics.median(apply)
    out["instance_tokens"] = len(ids)
    return out


def decode_rates(artifacts: list[str], gen_tokens: int, repeats: int, threads: int | None) -> list[dict[str, Any]]:
    """Greedy decode tok/s through qwen_edge.runtime.generate, free vs. under a schema, alternated, on each artifact."""
    import qwen_edge
    from qwen_edge.runtime import constrain
    from qwen_edge.runtime.generate import generate
    from qwen_edge.runtime.meta import model_meta
    from qwen_edge.runtime.sampling import Sampling
    from qwen_edge.text.tokenizer import Tokenizer

    # a schema that cannot close before gen_tokens: at least gen_tokens digits, one token or more each
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": gen_tokens}
    rows = []
    for art in artifacts:
        meta = model_meta(art)
        tok = Tokenizer.from_dir(meta.tokenizer_dir)
        rt = qwen_edge.load(art, threads=threads, max_context=1024)
        prompt = tok.encode_chat([{"role": "user", "content": "List some digits as a JSON array."}])
        c = constrain.json_schema(schema)
        rates: dict[str, list[float]] = {"free": [], "schema": []}
        try:
            for r in range(repeats + 1):  # the first round warms up and is dropped
                for mode in (("free", "schema") if r % 2 == 0 else ("schema", "free")):
                    rt.reset()
                    res = generate(rt, prompt, tokenizer=tok, max_new_tokens=gen_tokens, stop_ids=[],
                                   sampling=Sampling(), constraint=c if mode == "schema" else None)
                    assert res.stats.new_tokens == gen_tokens, (mode, res.finish_reason)
                    if r:
                        rates[mode].append(float(res.stats.decode_tokens_per_s or 0.0))
            info = rt.info
        finally:
            rt.close()
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append({"artifact": Path(art).name, "backend": info.backend, "format": info.format,
                     "quant": info.quant, "threads": info.threads, "decode_tokens_per_s": rates, "median": med,
                     "schema_over_free": med["schema"] / med["free"]})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="directory with the real Qwen tokenizer.json")
    ap.add_argument("--artifact", action="append", default=[], help="artifact for the decode tok/s (repeatable)")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mask-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--label", default="")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    from qwen_edge.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(a.tokenizer)
    masks = mask_costs(tokenizer, a.mask_repeats)
    decode = decode_rates(a.artifact, a.gen_tokens, a.repeats, a.threads) if a.artifact else []
    figures = {"mask": masks, "decode": decode}
    print(json.dumps(figures, indent=1))
    if not a.no_record:
        write_record("constrained", figures, label=a.label, settings={
            "tokenizer": a.tokenizer, "vocab": N_VOCAB, "schema": SCHEMA, "instance": INSTANCE,
            "coverage_schemas": list(COVERAGE), "artifacts": a.artifact, "gen_tokens": a.gen_tokens,
            "repeats": a.repeats, "mask_repeats": a.mask_repeats, "threads": a.threads})
    return 0


if __name__ == "__main__":
    sys.exit(main())
