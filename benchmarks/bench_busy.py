"""Decode and prefill tokens/s quiet and with another process busy on one core, per backend, threads and spin policy.

Each run is one fresh spawned process (qwen_edge.bench.run._measure: load, warm up, prefill + greedy decode); the busy
loop (`python -c "while True: pass"`, pinned to the last CPU) is started before the run and killed after it, so quiet
runs are quiet. Configurations alternate order across repeats (A B C ..., then ... C B A); medians are reported.

The spin policy goes in through the target profile (`spin: true|false`, a profile given as a mapping), the way a
user overrides it: onnxruntime's session.intra_op.allow_spinning, llama.cpp's OpenMP OMP_WAIT_POLICY (spin=true
leaves it unset: libgomp's spin-then-sleep default; false sets PASSIVE).

    python benchmarks/bench_busy.py --gguf /tmp/busy/q05-gguf-q4_0 --onnx /tmp/busy/q05-onnx-int4 \\
        --repeat 3 --json /tmp/busy/busy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import write_record  # noqa: E402

from qwen_edge.bench.run import _measure, bench_prompt  # noqa: E402


def busy_loop(cpu: int | None) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(p.pid, {cpu})
        except OSError:
            pass
    time.sleep(0.3)  # let it reach the loop
    return p


def stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def _own_cpu_s() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def wait_quiet(max_busy: float, timeout: float) -> float:
    """Wait until the machine's other load (CPU-cores busy, sampled over 1 s) is below max_busy; returns the last
    sample (the machine is shared: a test suite or another benchmark may be running)."""
    end = time.monotonic() + timeout
    while True:
        b0, t0 = _cpu_jiffies()
        o0 = _own_cpu_s()
        time.sleep(1.0)
        b1, t1 = _cpu_jiffies()
        ncpu = os.cpu_count() or 1
        load = max(0.0, (b1 - b0) / max(t1 - t0, 1) * ncpu - (_own_cpu_s() - o0))
        if load < max_busy or time.monotonic() > end:
            return load


def lab(spin: bool | int) -> str:
    return {True: "on", False: "off"}[spin] if isinstance(spin, bool) else spin if spin == "auto" else f"{spin} us"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def run_one(art: Path, threads: int, spin: bool, prompt: list[int], gen: int, warmup: int, ctx: int) -> dict:
    spec = {"path": str(art), "target": {"name": "cpu-x86_64", "spin": spin}, "threads": threads,
            "max_context": ctx, "prompt": prompt, "gen_tokens": gen, "warmup": warmup}
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:
        return ex.submit(_measure, spec).result()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, help="a GGUF artifact (llama.cpp)")
    ap.add_argument("--onnx", type=Path, help="an ONNX artifact (onnxruntime)")
    ap.add_argument("--threads", default="auto,1,2", help="thread counts; auto = the profile's default")
    ap.add_argument("--spin", default="on,off", help="spin policies to compare: on, off, N (microseconds)")
    ap.add_argument("--llama-spin", default="on,off", help="spin policies for llama.cpp (on, off)")
    ap.add_argument("--max-other-load", type=float, default=0.3,
                    help="rerun a run during which other processes kept more than this many cores busy")
    ap.add_argument("--tries", type=int, default=3, help="attempts per run when other load exceeds the bound")
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="seconds to wait for other load to drop below the bound before each attempt")
    ap.add_argument("--conditions", default="quiet,busy")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--busy-cpu", type=int, default=(os.cpu_count() or 1) - 1, help="CPU the busy loop is pinned to")
    ap.add_argument("--json", type=Path, help="write every run and the medians here")
    ap.add_argument("--label", default="", help="suffix of the record's file name under benchmarks/results/")
    ap.add_argument("--note", action="append", default=[], help="a sentence stored in the record (repeatable)")
    a = ap.parse_args(argv)
    if "OMP_WAIT_POLICY" in os.environ:
        print(f"note: OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} is exported: llama.cpp runs all use it",
              file=sys.stderr)
    arts = [p for p in (a.gguf, a.onnx) if p]
    if not arts:
        ap.error("give --gguf and/or --onnx")
    threads = [None if x == "auto" else int(x) for x in a.threads.split(",")]
    def parse_spin(x: str) -> bool | int | str:
        return {"on": True, "off": False, "auto": "auto"}[x] if x in ("on", "off", "auto") else int(x)

    spins = [parse_spin(x) for x in a.spin.split(",")]
    conds = a.conditions.split(",")
    ctx = 256 * ((a.prompt_tokens + a.gen_tokens + 8) // 256 + 1)
    prompts = {p: bench_prompt(p, a.prompt_tokens) for p in arts}
    lspins = [parse_spin(x) for x in a.llama_spin.split(",")]
    # one thread never waits on another: its spin policy is moot; threads=auto runs the defaults (spin auto)
    configs = [(p, th, sp, c) for p in arts for th in threads
               for sp in ((lspins if p == a.gguf else spins) if th not in (1, None) else ["auto"]) for c in conds]
    start = {"uptime": uptime(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(start["uptime"], file=sys.stderr)
    runs: dict[tuple, list[dict]] = {}
    t0 = time.perf_counter()
    for r in range(a.repeat):
        for cfg in (configs if r % 2 == 0 else configs[::-1]):
            art, th, sp, cond = cfg
            for attempt in range(a.tries):
                before = wait_quiet(a.max_other_load, a.quiet_wait)
                busy = busy_loop(a.busy_cpu) if cond == "busy" else None
                b0, t0_ = _cpu_jiffies()
                o0, w0 = _own_cpu_s(), time.monotonic()
                try:
                    res = run_one(art, th, sp, prompts[art], a.gen_tokens, a.warmup, ctx)
                finally:
                    if busy:
                        stop(busy)
                b1, t1_ = _cpu_jiffies()
                wall = time.monotonic() - w0
                # cores kept busy by processes other than this benchmark's (its run and its busy loop)
                other = max(0.0, ((b1 - b0) / max(t1_ - t0_, 1) * (os.cpu_count() or 1) * wall
                                  - (_own_cpu_s() - o0)) / wall)
                res.update(other_load_before=round(before, 2), other_load_during=round(other, 2), attempt=attempt + 1)
                if other <= a.max_other_load or attempt + 1 == a.tries:
                    break
                print(f"  other processes kept {other:.2f} cores busy: again", file=sys.stderr, flush=True)
            res.pop("steps_s", None)
            runs.setdefault(cfg, []).append(res)
            print(f"[{r + 1}/{a.repeat}] {art.name} {th or 'auto'}t (ran {res['threads_used']}) spin={lab(sp)} "
                  f"{cond}: decode "
                  f"{res['decode_tokens_per_s']:.1f} tok/s, prefill {res['prefill_tokens_per_s']:.1f} tok/s "
                  f"(other load {res['other_load_during']:.2f})",
                  file=sys.stderr, flush=True)
    end = uptime()
    print(end, file=sys.stderr)
    rows = []
    for cfg, rs in runs.items():
        art, th, sp, cond = cfg
        rows.append({"artifact": art.name, "backend": rs[0]["backend"], "threads": th, "spin": sp,
                     "condition": cond,
                     "decode_tokens_per_s": statistics.median(x["decode_tokens_per_s"] for x in rs),
                     "decode_min_max": [min(x["decode_tokens_per_s"] for x in rs),
                                        max(x["decode_tokens_per_s"] for x in rs)],
                     "prefill_tokens_per_s": statistics.median(x["prefill_tokens_per_s"] for x in rs),
                     "other_load": statistics.median(x["other_load_during"] for x in rs), "repeats": len(rs),
                     "threads_used": sorted({x["threads_used"] for x in rs})})
    # busy / quiet: the same setting; busy / best quiet: against the fastest quiet setting of that backend
    lines = ["| backend | threads (ran quiet / busy) | spin | quiet decode tok/s | busy decode tok/s (min-max) "
             "| busy / quiet | busy / best quiet | quiet prefill tok/s | busy prefill tok/s | other load quiet/busy |",
             "|" + "---|" * 10]

    def f(x: dict | None, k: str) -> str:
        return (f"{x[k]:.1f}" if k != "other_load" else f"{x[k]:.2f}") if x else "-"

    for art in arts:
        mine = [x for x in rows if x["artifact"] == art.name]
        best = max((x["decode_tokens_per_s"] for x in mine if x["condition"] == "quiet"), default=None)
        for th, sp in dict.fromkeys((c[1], c[2]) for c in configs if c[0] == art):
            q = next((x for x in mine if (x["threads"], x["spin"], x["condition"]) == (th, sp, "quiet")), None)
            b = next((x for x in mine if (x["threads"], x["spin"], x["condition"]) == (th, sp, "busy")), None)
            if not (q or b):
                continue
            busy = (f"{b['decode_tokens_per_s']:.1f} ({b['decode_min_max'][0]:.1f}-{b['decode_min_max'][1]:.1f})"
                    if b else "-")
            ratio = f"{b['decode_tokens_per_s'] / q['decode_tokens_per_s']:.0%}" if (q and b) else "-"
            ratio_best = f"{b['decode_tokens_per_s'] / best:.0%}" if (b and best) else "-"
            used = " / ".join(",".join(map(str, x["threads_used"])) if x else "-" for x in (q, b))
            lines.append(f"| {(q or b)['backend']} | {th or 'auto'} (ran {used}) | {lab(sp)} "
                         f"| {f(q, 'decode_tokens_per_s')} | {busy} | {ratio} | {ratio_best} "
                         f"| {f(q, 'prefill_tokens_per_s')} | {f(b, 'prefill_tokens_per_s')} "
                         f"| {f(q, 'other_load')}/{f(b, 'other_load')} |")
    table = "\n".join(lines)
    print(table)
    print(f"\n{a.prompt_tokens} prompt / {a.gen_tokens} generated tokens, {a.repeat} repeats after {a.warmup} warm-up, "
          f"medians; {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"start": start, "end_uptime": end, "args": vars(a) | {
            "gguf": str(a.gguf), "onnx": str(a.onnx), "json": str(a.json)}, "rows": rows, "table": table,
            "runs": {" ".join(map(str, k)): v for k, v in runs.items()}}, indent=2, default=str))
    write_record("busy", json.loads(json.dumps({"rows": rows, "start_uptime": start["uptime"], "end_uptime": end,
                                                "runs": {" ".join(map(str, k)): v for k, v in runs.items()}},
                                               default=str)),
                 settings=json.loads(json.dumps(vars(a), default=str)), notes=a.note, label=a.label,
                 argv=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
