"""`qwen-edge demo`: synthesize Qwen2.5-0.5B, export GGUF and ONNX, verify, chat through both, bench side by side."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from ..errors import GateFailed, QwenEdgeError

DEMO_ARCH = "qwen2.5-0.5b"
QUICK_ARCH = "tiny-qwen2"
DEMO_CONTEXT = 2048
DEMO_FORMATS = (("GGUF q4_k_m", "gguf", "q4_k_m"), ("ONNX int4", "onnx", "int4"))
SYSTEM = "You are a concise assistant running on an edge device."
QUESTION = "In one sentence: why do quantized models run faster on a CPU?"
SYNTH_NOTE = (
    "note: these weights are synthesized (random, architecture-exact), so the replies above are meaningless text.\n"
    "      The speed figures still hold: the graphs have the real model's shapes, the same bytes are read per\n"
    "      token and the same arithmetic runs, and decode speed depends on that, not on what the weights say.\n"
    "      Run it on a real checkpoint: qwen-edge demo --model PATH/TO/Qwen2.5-0.5B-Instruct"
)
QUICK_NOTE = ("      --quick used a tiny architecture, so its figures are not those of a released model; without\n"
              "      --quick the demo synthesizes the real Qwen2.5-0.5B shapes.")


class Progress:
    """Numbered steps on stderr, each with its elapsed time; a live ticker while a step runs on a terminal."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total = total
        self.n = 0
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[dict[str, str]]:
        """Run one step; the body may set `note["status"]` (shown live on a terminal) and `note["text"]` (appended
        to the step's closing line)."""
        self.n += 1
        head = f"[{self.n}/{self.total}] {title}"
        note: dict[str, str] = {"text": "", "status": ""}
        t0 = time.perf_counter()
        stop = threading.Event()
        ticker = None
        if self.live:
            def tick() -> None:
                while not stop.wait(0.5):
                    status = note.get("status", "")[:70]
                    line = f"{head} … {time.perf_counter() - t0:4.0f} s" + (f"  {status}" if status else "")
                    self._write(f"\r\033[K{line}")
            self._write(f"{head} …")
            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        else:
            self._write(f"{head} …\n")
        try:
            yield note
        except BaseException:
            stop.set()
            if ticker:
                ticker.join()
            lead = "\r\033[K" if self.live else ""
            self._write(f"{lead}{head}: failed after {time.perf_counter() - t0:.1f} s\n")
            raise
        stop.set()
        if ticker:
            ticker.join()
        done = f"{head}: done in {time.perf_counter() - t0:.1f} s" + (f" — {note['text']}" if note["text"] else "")
        self._write(("\r\033[K" if self.live else "") + done + "\n")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _checkpoint(arch: str, out: Path) -> tuple[Path, bool]:
    """The synthesized checkpoint under `out` (and whether it was reused: an intact one of the same arch)."""
    from ..model.checkpoint import Checkpoint
    from ..model.synth import synth

    path = out / f"checkpoint-{arch}"
    if (path / "config.json").is_file():
        try:
            ck = Checkpoint(path)
            ck.close()
            if json.loads((path / "config.json").read_text()).get("_name_or_path") == f"qwen-edge/synth-{arch}":
                return path, True
        except (QwenEdgeError, ValueError, OSError):
            pass
    return synth(arch, path, seed=0), False


def _recipe(source: Path, fmt: str, quant: str, name: str):
    from ..recipes.recipe import QuantConfig, Recipe, VerifyConfig

    q = QuantConfig(type=quant, block_size=32, accuracy_level=4) if fmt == "onnx" else QuantConfig(type=quant)
    gate = VerifyConfig(quick=True)  # verify relaxes top-1/greedy itself on synthesized (random) weights
    return Recipe(name=f"demo-{name}", description="qwen-edge demo", source=str(source), format=fmt, quant=q,
                  target="cpu-x86_64", max_context=DEMO_CONTEXT, verify=gate, output=name)


def _fmt_ids(ids: list[int], keep: int = 12) -> str:
    if len(ids) <= 2 * keep:
        return str(ids)
    return f"[{', '.join(map(str, ids[:keep]))}, … {', '.join(map(str, ids[-keep:]))}] ({len(ids)} ids)"


def _verify_step(progress: Progress, outcomes: dict[str, Any], source: Path) -> dict[str, str]:
    from ..recipes.recipe_run import verify_available, verify_outcome

    if not verify_available():
        with progress.step("verify against the PyTorch reference") as note:
            note["text"] = "skipped: install the verify extra (pip install -e '.[verify]') for torch + transformers"
        return {k: "skipped (no verify extra)" for k in outcomes}
    results: dict[str, str] = {}
    for label, (outcome, recipe) in outcomes.items():
        with progress.step(f"verify {label} against the PyTorch reference (quick text)") as note:
            verify_outcome(outcome, recipe, str(source), log=lambda msg, n=note: n.__setitem__("status", str(msg)))
            m = (outcome.report or {}).get("metrics") or {}
            shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("kl_mean", "max_abs_logit_error", "top1_agreement")
                              if isinstance(m.get(k), (int, float)))
            results[label] = outcome.verify if not shown or not outcome.passed else f"passed ({shown})"
            note["text"] = results[label]
    return results


def _chat_step(progress: Progress, arts: dict[str, Path]) -> dict[str, list[int]]:
    """One scripted turn through each backend; returns the prompt ids each one was fed."""
    from ..backends import load
    from ..runtime.chat import ChatSession
    from ..runtime.sampling import Sampling
    from ..text.tokenizer import Tokenizer

    prompts: dict[str, list[int]] = {}
    for label, art in arts.items():
        with progress.step(f"chat one turn through {label}") as note:
            tok = Tokenizer.from_dir(art)
            with load(art, "cpu", max_context=DEMO_CONTEXT) as rt:
                session = ChatSession(rt, tok, system=SYSTEM, sampling=Sampling(temperature=0.0), max_new_tokens=24)
                result = session.send(QUESTION)
            prompts[label] = list(result.prompt_ids)
            note["text"] = f"{result.stats.new_tokens} tokens at {result.stats.decode_tokens_per_s or 0:.1f} tok/s"
        _say(f"  {label} ({rt.info.backend}) prompt ids: {_fmt_ids(prompts[label])}")
        _say(f"  {label} reply ({len(result.output_ids)} tokens, greedy): {result.raw_text[:120]!r}")
    return prompts


def _bench_step(progress: Progress, arts: dict[str, Path], quick: bool) -> dict[str, Any]:
    from ..bench.run import bench

    n_prompt, n_gen, repeat = (16, 8, 1) if quick else (128, 64, 3)
    with progress.step(f"bench side by side ({n_prompt}-token prompt, {n_gen} new tokens, {repeat} repeats)") as note:
        report = bench([str(a) for a in arts.values()], prompt_tokens=n_prompt, gen_tokens=n_gen, repeat=repeat,
                       warmup=1, max_context=DEMO_CONTEXT, log=lambda msg: note.__setitem__("status", str(msg)))
    return report if isinstance(report, dict) else report.to_dict()


def _bound(roof: dict[str, Any]) -> str:
    """Tokens/s the machine's read bandwidth allows for the bytes each token reads, and the share reached."""
    b, f = roof.get("bound_tokens_per_s"), roof.get("fraction")
    if not isinstance(b, (int, float)):
        return "-"
    return f"{b:.0f}" + (f" ({100 * f:.0f}%)" if isinstance(f, (int, float)) else "")


def _render_bench(report: dict[str, Any], labels: list[str]) -> str:
    def med(r: dict[str, Any], key: str) -> str:
        v = r.get(key)
        v = v.get("median") if isinstance(v, dict) else v
        return f"{v:.1f}" if isinstance(v, (int, float)) else "-"

    rows = [("artifact", "size", "bits/w", "prefill tok/s", "decode tok/s", "TTFT ms", "decode bound tok/s")]
    for label, r in zip(labels, report.get("results", [])):
        ttft = r.get("time_to_first_token_s")
        ttft = ttft.get("median") if isinstance(ttft, dict) else ttft
        bpw = r.get("bits_per_weight")
        rows.append((label, f"{(r.get('size_bytes') or 0) / 1e6:.0f} MB",
                     f"{bpw:.2f}" if isinstance(bpw, (int, float)) else "-",
                     med(r, "prefill_tokens_per_s"), med(r, "decode_tokens_per_s"),
                     f"{ttft * 1000:.0f}" if isinstance(ttft, (int, float)) else "-",
                     _bound(r.get("roofline") or {})))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def run_demo(model: str | None = None, out_dir: str = "qwen-edge-demo", quick: bool = False) -> int:
    """The README's tour, offline: checkpoint -> GGUF q4_k_m + ONNX int4 -> verify -> chat -> bench."""
    from ..recipes.recipe_run import export_recipe, verify_available

    t_start = time.perf_counter()
    out = Path(out_dir)
    arch = QUICK_ARCH if quick else DEMO_ARCH
    progress = Progress(total=2 + 2 * len(DEMO_FORMATS) + (len(DEMO_FORMATS) if verify_available() else 1))
    synthesized = model is None
    if model is not None:
        from ..model.checkpoint import open_checkpoint

        with progress.step(f"open checkpoint {model}") as note:
            ck = open_checkpoint(model)
            source = ck.path
            note["text"] = f"{ck.arch.family}, {ck.arch.num_layers} layers, hidden {ck.arch.hidden_size}"
            ck.close()
    else:
        with progress.step(f"synthesize {arch} (architecture-exact, random weights, real tokenizer)") as note:
            source, reused = _checkpoint(arch, out)
            note["text"] = ("reused " if reused else "") + str(source)
    arts: dict[str, Path] = {}
    outcomes: dict[str, Any] = {}
    for label, fmt, quant in DEMO_FORMATS:
        with progress.step(f"export {label}") as note:
            recipe = _recipe(source, fmt, quant, f"{fmt}-{quant}")
            outcome = export_recipe(recipe, out / "artifacts", verify=False)
            arts[label], outcomes[label] = outcome.path, (outcome, recipe)
            note["text"] = ("reused (same inputs) " if outcome.skipped else "") + str(outcome.path)
    verdicts = _verify_step(progress, outcomes, source)
    if synthesized and any(v.startswith(("passed", "FAILED")) for v in verdicts.values()):
        _say("  (random weights: top-1 and greedy agreement are reported but not gated; their next-token distributions\n"
             "   are near uniform, so the argmax is a coin toss. KL divergence, logit error and perplexity change\n"
             "   measure the quantization and stay gated; on a real checkpoint (--model) every default gate applies.)")
    _say("")
    _say(f"user: {QUESTION}")
    prompts = _chat_step(progress, arts)
    ids = list(prompts.values())
    same = all(p == ids[0] for p in ids)
    _say(f"  prompt ids identical on both backends: {'yes' if same else 'NO'} ({len(ids[0])} ids, one tokenizer, "
         "one chat template, from the artifact)")
    report = _bench_step(progress, arts, quick)
    _say("")
    _say(_render_bench(report, list(arts)))
    machine = report.get("machine") or {}
    cfg = report.get("config") or {}
    _say(f"  {cfg.get('prompt_tokens')}-token prompt, {cfg.get('gen_tokens')} new tokens, median of "
         f"{cfg.get('repeat')}; {machine.get('cpu', 'this CPU')}, read bandwidth {machine.get('read_bandwidth_gbps')} "
         "GB/s (full report: qwen-edge bench ARTIFACT... --markdown FILE --plot FILE)")
    _say("")
    for label, path in arts.items():
        _say(f"  {label}: {path}  verify: {verdicts.get(label, '-')}")
    if synthesized:
        _say("")
        _say(SYNTH_NOTE)
        if quick:
            _say(QUICK_NOTE)
    _say(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s; rerun reuses the outputs in {out}/")
    if not same:
        raise QwenEdgeError("the two backends were fed different prompt ids (a bug: please report it)")
    failed = [label for label, (o, _) in outcomes.items() if not o.passed]
    if failed:
        raise GateFailed(f"verify failed for {', '.join(failed)} (details: qwen-edge verify ARTIFACT)")
    return 0
