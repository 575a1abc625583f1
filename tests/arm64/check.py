"""The arm64 checks (issue 16), run by .ci/arm64 on the x86 host once the emulated arm64 root is ready.

Exports on x86 (GGUF f32 q8_0 q4_0 q4_k_m, ONNX fp32 int8 int4; the trained fidelity checkpoint and the
tiny-qwen3-256 architecture), then runs each artifact inside the root through the same CLI and compares with the
x86 run of the same artifact:
- prompt ids identical for every artifact (`generate --json`), greedy output identical for f32/fp32;
- quantized logits on the fidelity checkpoint: KL and top-1 agreement of the arm64 run against the x86 run of the
  same artifact, within ARM64_VS_X86 below;
- a scripted `chat` transcript identical to x86's for f32/fp32; `inspect` reads every artifact;
- `verify --on-device` (no torch in the root) passes the faithful artifacts and fails a broken copy;
- `bench` with the arm64-mobile profile, labelled emulated; what onnxruntime and llama.cpp report as their kernels.

Not a pytest module (the default run does not collect it). Exit 0 when every check holds, 1 otherwise.
Inside the root it is also run as `check.py --in-root-logits ...` (numpy and qwen_edge only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GGUF_QUANTS = ("f32", "q8_0", "q4_0", "q4_k_m")
ONNX_QUANTS = ("fp32", "int8", "int4")
FULL = ("f32", "fp32")
PROMPT = "Say hello to the robot."
NEW_TOKENS = 16
CHAT_SCRIPT = "Hello there.\nWhat is two plus two?\n/reset\nName a colour.\n/exit\n"
TOP_K = 64
"""Logits kept per position from the x86 run (KL over them plus one bucket for the rest: a lower bound)."""
LOGIT_WINDOWS = 2
"""Windows of the quick evaluation text compared (~300 positions: each costs a full-vocabulary LM head, emulated)."""
ON_DEVICE = ("fid-gguf-q4_0", "fid-onnx-int4", "fid-onnx-int8")
"""Artifacts verified on the device (`verify --on-device`); a broken copy of the last must fail."""

# Quantized artifacts: the arm64 run vs the x86 run of the same artifact (fidelity checkpoint). They differ by the
# kernels' order of summation, llama.cpp's q4_0 repacking, onnxruntime's int8 activation blocks (SDOT vs VNNI).
# Measured on the quick text (596 positions, Cortex-A76 model vs AVX512-VNNI host): kl_mean q8_0 4.9e-6,
# q4_0 4.7e-6, q4_k_m 4.8e-6, int8 2.7e-5, int4 1.1e-4; top-1 >= 0.9966. The bounds are ~10x above the worst.
ARM64_VS_X86 = {
    "8bit": {"kl_mean": 3e-4, "top1_agreement": 0.99},
    "4bit": {"kl_mean": 1e-3, "top1_agreement": 0.98},
}
QUANT_CLASS = {"q8_0": "8bit", "int8": "8bit", "q4_0": "4bit", "q4_k_m": "4bit", "int4": "4bit"}


# --- inside the root ---------------------------------------------------------------------------------------------
def in_root_logits(jobs_file: str, out_file: str, threads: int) -> None:
    """For each (artifact, x86 record): this runtime's logits on the recorded windows against the record."""
    import numpy as np

    from qwen_edge.backends import load
    from qwen_edge.quality.reference import Reference
    from qwen_edge.quality.verify_device import DeviceAccumulator

    results = {}
    for job in json.loads(Path(jobs_file).read_text()):
        rec = json.loads(Path(job["record"]).read_text())
        ref = Reference(rec["reference"], job["artifact"])
        acc = DeviceAccumulator()
        t0 = time.perf_counter()
        rt = load(job["artifact"], threads=threads, max_context=max(ref.lengths) + 8)
        try:
            pos = nxt = 0
            for w in rec["windows"]:
                n = len(w)
                rt.reset()
                acc.add_compact(w, rt.prefill_all_logits(w), ref.top_ids[pos:pos + n], ref.top_logits[pos:pos + n],
                                ref.lse[pos:pos + n], ref.next_logprob[nxt:nxt + n - 1])
                pos, nxt = pos + n, nxt + n - 1
        finally:
            rt.close()
        m = acc.metrics()
        m["seconds"] = round(time.perf_counter() - t0, 2)
        results[job["name"]] = {k: float(v) for k, v in m.items()} | {"positions": int(np.sum(ref.lengths))}
    Path(out_file).write_text(json.dumps(results, indent=1))


def in_root_info() -> None:
    import importlib.util

    from qwen_edge.device.hwinfo import report
    from qwen_edge.device.targets import default_target_name

    print(json.dumps({"hw": report(), "default_target": default_target_name(),
                      "torch_importable": importlib.util.find_spec("torch") is not None,
                      "python": sys.version.split()[0]}))


# --- on the host -------------------------------------------------------------------------------------------------
class Checker:
    def __init__(self, a: argparse.Namespace):
        self.root, self.shared, self.inside, self.site = Path(a.root), Path(a.shared), a.inside, a.site
        self.threads = a.threads
        self.failures: list[str] = []
        self.t0 = time.time()
        self.phase_t = self.t0

    # paths: the shared directory is self.shared on the host and self.inside in the root
    def guest(self, p: Path) -> str:
        return self.inside + "/" + str(Path(p).relative_to(self.shared))

    def log(self, msg: str) -> None:
        print(f"[arm64 {time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            print(f"  FAIL {what}", flush=True)
        return ok

    def host(self, *args: str, stdin: str | None = None, ok=(0,)) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "qwen_edge.cli", *args], capture_output=True, text=True,
                           input=stdin, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode not in ok:
            raise SystemExit(f"x86: qwen-edge {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
        return r

    def arm(self, *argv: str, stdin: str | None = None, ok=(0,), cli: bool = True) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "PYTHONPATH": self.site,
               "QEMU_CPU": "cortex-a76", "HF_HUB_OFFLINE": "1",
               "QWEN_EDGE_EMULATED": "qemu-user, Cortex-A76 model, x86-64 host"}
        cmd = [shutil.which("chroot") or "/usr/sbin/chroot", str(self.root), "/usr/bin/python3"]
        cmd += ["-m", "qwen_edge.cli", *argv] if cli else list(argv)
        r = subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=1800, env=env)
        if r.returncode not in ok:
            self.check(False, f"arm64: {' '.join(argv)} exited {r.returncode}: {_tail(r.stderr)}")
        return r

    # --- steps ---------------------------------------------------------------------------------------------------
    def info(self) -> None:
        shutil.copy(__file__, self.shared / "check.py")
        r = self.arm(self.guest(self.shared / "check.py"), "--in-root-info", cli=False)
        info = json.loads(r.stdout.strip().splitlines()[-1])
        hw = info["hw"]
        self.log(f"arm64 root: Python {info['python']}, {hw['arch']}, emulated: {hw['emulated']}")
        print(f"  CPU features (hwcaps): {' '.join(hw['cpu_features'])}")
        print(f"  llama.cpp reports: {hw['llama_cpp']}")
        print(f"  onnxruntime {hw['onnxruntime'].get('version')}: providers {hw['onnxruntime'].get('providers')}, "
              f"MLAS dispatch from these features: {hw['onnxruntime'].get('mlas')}")
        self.check(hw["arch"] == "aarch64", f"arm64 root runs {hw['arch']}")
        self.check(info["default_target"] == "arm64-mobile", f"default target there: {info['default_target']}")
        self.check(not info["torch_importable"], "torch is importable in the arm64 root")
        self.check("asimddp" in hw["cpu_features"], "no dot-product (asimddp) in the emulated CPU's features")
        self.check("DOTPROD = 1" in (hw["llama_cpp"] or ""), "llama.cpp does not report DOTPROD")

    def export_all(self) -> dict[str, dict]:
        from fidelity import fidelity_checkpoint

        from qwen_edge.export import export
        from qwen_edge.model.synth import synth

        ckpts = {"fid": fidelity_checkpoint(), "k256": synth("tiny-qwen3-256", self.shared / "ckpt" / "k256")}
        arts: dict[str, dict] = {}
        for model, ck in ckpts.items():
            for fmt, quants in (("gguf", GGUF_QUANTS), ("onnx", ONNX_QUANTS)):
                for q in quants:
                    name = f"{model}-{fmt}-{q}"
                    path = export(ck, fmt, q, self.shared / "art", name=name, target="arm64-mobile")
                    arts[name] = {"model": model, "format": fmt, "quant": q, "path": path}
        self.log(f"exported {len(arts)} artifacts on x86 (target arm64-mobile)")
        return arts

    def verify_x86(self, arts: dict[str, dict]) -> None:
        """verify (quick) against torch on x86: records the reference logits --on-device needs."""
        from qwen_edge.quality.verify import verify

        for name in ON_DEVICE:
            rep = verify(arts[name]["path"], quick=True)
            self.check(rep["passed"], f"{name}: x86 verify against torch failed {rep['failed']}")
        self.log(f"verified {', '.join(ON_DEVICE)} against torch on x86 (quick text; reference logits recorded)")

    def x86_records(self, arts: dict[str, dict]) -> list[dict]:
        """The x86 run's top-64 logits on the first quick evaluation windows, per quantized fidelity artifact."""
        from qwen_edge.backends import load
        from qwen_edge.text.tokenizer import Tokenizer
        from qwen_edge.quality.verify import load_eval_set
        from qwen_edge.quality.reference import ReferenceRecorder

        jobs = []
        (self.shared / "x86").mkdir(exist_ok=True)
        for name, a in arts.items():
            if a["model"] != "fid" or a["quant"] in FULL:
                continue  # f32/fp32: the greedy output and the chat transcript must be identical instead
            windows = load_eval_set(Tokenizer.from_dir(a["path"]), quick=True).windows[:LOGIT_WINDOWS]
            rec = ReferenceRecorder(top_k=TOP_K)
            rt = load(a["path"], threads=self.threads, max_context=max(len(w) for w in windows) + 8)
            try:
                for w in windows:
                    rt.reset()
                    rec.add_window(w, rt.prefill_all_logits(w))
            finally:
                rt.close()
            rec.add_greedy([])
            f = self.shared / "x86" / f"{name}.json"
            f.write_text(json.dumps({"windows": windows, "reference": rec.record("", True, 0)}))
            jobs.append({"name": name, "artifact": self.guest(a["path"]), "record": self.guest(f)})
        self.log(f"x86 logits recorded for {len(jobs)} quantized fidelity artifacts")
        return jobs

    def generate_all(self, arts: dict[str, dict]) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        gen = ["--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--threads", str(self.threads), "--json"]
        for name, a in arts.items():
            x = json.loads(self.host("generate", str(a["path"]), *gen).stdout)
            r = self.arm("generate", self.guest(a["path"]), *gen)
            y = json.loads(r.stdout) if r.returncode == 0 else {"prompt_ids": None, "output_ids": None}
            row = {"prompt_ids": len(x["prompt_ids"]), "prompt_same": x["prompt_ids"] == y["prompt_ids"],
                   "greedy_same": x["output_ids"] == y["output_ids"],
                   "decode_tps_emulated": (y.get("stats") or {}).get("decode_tokens_per_s")}
            self.check(row["prompt_same"], f"{name}: prompt ids differ between x86 and arm64")
            if a["quant"] in FULL:
                self.check(row["greedy_same"], f"{name}: f32/fp32 greedy output differs: x86 {x['output_ids']} "
                           f"arm64 {y['output_ids']}")
            ins = self.arm("inspect", self.guest(a["path"]), "--json")
            if ins.returncode == 0:
                self.check(json.loads(ins.stdout)["quant"] == a["quant"], f"{name}: inspect on arm64 disagrees")
            rows[name] = row
        self.log(f"generate --json and inspect: {len(arts)} artifacts on x86 and arm64")
        return rows

    def chat(self, arts: dict[str, dict]) -> None:
        args = ["--temperature", "0", "--max-new-tokens", "8", "--threads", str(self.threads)]
        for name in ("fid-onnx-fp32", "fid-gguf-f32", "k256-onnx-fp32", "k256-gguf-f32"):
            a = arts[name]
            x = self.host("chat", str(a["path"]), *args, stdin=CHAT_SCRIPT)
            y = self.arm("chat", self.guest(a["path"]), *args, stdin=CHAT_SCRIPT)
            self.check(y.returncode == 0 and x.stdout == y.stdout and x.stdout.strip() != "",
                       f"{name}: scripted chat transcript differs: x86 {x.stdout[-200:]!r} arm64 {y.stdout[-200:]!r}")
        self.log("scripted chat: the same transcript on x86 and arm64 (f32/fp32)")

    def logits(self, jobs: list[dict], rows: dict[str, dict]) -> None:
        jf = self.shared / "logit_jobs.json"
        jf.write_text(json.dumps(jobs))
        out = self.shared / "logit_results.json"
        self.arm(self.guest(self.shared / "check.py"), "--in-root-logits", self.guest(jf), self.guest(out),
                 "--threads", str(self.threads), cli=False)
        res = json.loads(out.read_text()) if out.is_file() else {}
        for job in jobs:
            name = job["name"]
            m = res.get(name)
            q = name.rsplit("-", 1)[1]
            bound = ARM64_VS_X86[QUANT_CLASS[q]]
            if not self.check(m is not None, f"{name}: no arm64 logits"):
                continue
            rows[name].update(kl_mean=m["kl_mean"], kl_p99=m["kl_p99"], top1=m["top1_agreement"],
                              mass=m["topk_mass_mean"], bound=bound)
            self.check(m["kl_mean"] <= bound["kl_mean"] and m["top1_agreement"] >= bound["top1_agreement"],
                       f"{name}: arm64 vs x86 kl_mean {m['kl_mean']:.3g} top-1 {m['top1_agreement']:.4f} outside "
                       f"{bound}")
        self.log("logits on the fidelity checkpoint: arm64 run vs x86 run of each artifact")

    def verify_on_device(self, arts: dict[str, dict], rows: dict[str, dict]) -> None:
        for name in ON_DEVICE:
            a = arts[name]
            r = self.arm("verify", self.guest(a["path"]), "--on-device", "--threads", str(self.threads), "--json",
                         ok=(0, 1))
            rep = json.loads(r.stdout) if r.stdout.strip() else {}
            rows[name]["on_device"] = "passed" if r.returncode == 0 else f"FAILED {rep.get('failed')}"
            self.check(r.returncode == 0 and rep.get("passed") is True,
                       f"{name}: verify --on-device on arm64: {rows[name]['on_device']} {_tail(r.stderr)}")
        from broken import break_onnx_weights

        broken = break_onnx_weights(arts[ON_DEVICE[-1]]["path"], self.shared / "art" / f"{ON_DEVICE[-1]}-broken")
        r = self.arm("verify", self.guest(broken), "--on-device", "--threads", str(self.threads), ok=(1,))
        self.check(r.returncode == 1 and "FAILED" in r.stdout, "a broken artifact passed verify --on-device")
        print(f"  broken copy ({ON_DEVICE[-1]}, weights perturbed, hashes refreshed): exit "
              f"{r.returncode}, {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}"[:300])
        self.log("verify --on-device in the root (no torch): faithful artifacts pass, the broken one fails")

    def kernels_and_bench(self, arts: dict[str, dict]) -> None:
        r = self.arm("-v", "generate", self.guest(arts["fid-gguf-q4_0"]["path"]), "--prompt", "Hi",
                     "--max-new-tokens", "1", "--threads", str(self.threads))
        repack = [ln.strip() for ln in r.stderr.splitlines() if "REPACK" in ln or "repack" in ln]
        print("  llama.cpp at load of q4_0 (its log): " + (" | ".join(repack[:4]) or "no repack lines"))
        self.check(bool(repack), "llama.cpp did not repack q4_0 for the arm64 kernels")
        md = self.shared / "bench.md"
        r = self.arm("bench", self.guest(arts["fid-gguf-q4_0"]["path"]), self.guest(arts["fid-onnx-int4"]["path"]),
                     "--target", "arm64-mobile", "--prompt-tokens", "32", "--gen-tokens", "8", "--repeat", "1",
                     "--warmup", "0", "--json", "--markdown", self.guest(md))
        if r.returncode == 0:
            rep = json.loads(r.stdout)
            self.check(bool(rep["machine"].get("emulated")), "bench on the emulated root is not labelled emulated")
            self.check(all(x["threads"] == 4 for x in rep["results"]), "bench did not use arm64-mobile's 4 threads")
            print("  bench, arm64-mobile profile (EMULATED: times the emulator, not a CPU; never compare):")
            print("    " + md.read_text().replace("\n", "\n    "))
        self.log("bench with the arm64-mobile profile")

    def summary(self, rows: dict[str, dict]) -> None:
        print("\nartifact             prompt ids  greedy   KL(x86||arm64)  top-1    bound (KL, top-1)   on-device verify")
        for name, r in rows.items():
            kl = f"{r['kl_mean']:.3g}" if "kl_mean" in r else "-"
            t1 = f"{r['top1']:.4f}" if "top1" in r else "-"
            b = f"{r['bound']['kl_mean']:g}, {r['bound']['top1_agreement']:g}" if "bound" in r else "-"
            print(f"{name:<20} {'same' if r['prompt_same'] else 'DIFF':<11} {'same' if r['greedy_same'] else 'diff':<8}"
                  f" {kl:<15} {t1:<8} {b:<19} {r.get('on_device', '-')}")


def _tail(s: str, n: int = 300) -> str:
    lines = [ln for ln in s.strip().splitlines() if "cpuid_info warning" not in ln]
    return (lines[-1] if lines else "")[-n:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", help="the arm64 root (host path)")
    ap.add_argument("--shared", help="host directory mounted in the root at --inside")
    ap.add_argument("--inside", default="/work")
    ap.add_argument("--site", default="/opt/site", help="PYTHONPATH inside the root")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--in-root-info", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-root-logits", nargs=2, metavar=("JOBS", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.in_root_info:
        in_root_info()
        return 0
    if a.in_root_logits:
        in_root_logits(*a.in_root_logits, threads=a.threads)
        return 0
    if not (a.root and a.shared):
        ap.error("--root and --shared are required")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fidelity.py, broken.py
    c = Checker(a)
    c.info()
    arts = c.export_all()
    c.verify_x86(arts)
    jobs = c.x86_records(arts)
    rows = c.generate_all(arts)
    c.logits(jobs, rows)
    c.verify_on_device(arts, rows)
    c.chat(arts)
    c.kernels_and_bench(arts)
    c.summary(rows)
    if c.failures:
        print(f"\narm64: {len(c.failures)} check(s) failed:\n  " + "\n  ".join(c.failures))
        return 1
    print(f"\narm64: all checks passed in {time.time() - c.t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
