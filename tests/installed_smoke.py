"""The paths a user of an installed qwen-edge takes, run from a directory outside the checkout.

    python tests/installed_smoke.py --docs docs/api.md --checkout . --workdir /tmp/smoke

Runs the `qwen-edge` on PATH and this interpreter: recipes (packaged and a user's own), synth, export of both
formats by flags and by a packaged recipe name, a user's own target profile, generate from both (same prompt
ids), a chat turn on stdin, and every example of docs/api.md. Used by tests/test_installed.py (a wheel
installed into a temporary directory) and by .ci/run (a wheel installed with its dependencies into a fresh
venv). Exits 1 with the failing step on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


class SmokeFailed(Exception):
    pass


def run(cmd: list[str], cwd: Path, *, input: str | None = None, env: dict[str, str] | None = None,
        expect: int = 0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, input=input, timeout=900,
                         env={**os.environ, **(env or {})})
    if res.returncode != expect:
        raise SmokeFailed(f"{' '.join(cmd)}: exit {res.returncode} (expected {expect})\n"
                          f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-3000:]}")
    return res


def doc_blocks(doc: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)


def smoke(docs: Path, checkout: Path, work: Path, log: Any = print) -> None:
    exe = shutil.which("qwen-edge")
    if exe is None:
        raise SmokeFailed("qwen-edge is not on PATH")
    qe = [exe]
    py = sys.executable
    if work.resolve().is_relative_to(checkout.resolve()):
        raise SmokeFailed(f"{work}: must be outside the checkout {checkout}")
    work.mkdir(parents=True, exist_ok=True)

    where = run([py, "-c", "import qwen_edge; print(qwen_edge.__file__)"], work).stdout.strip()
    if Path(where).resolve().is_relative_to(checkout.resolve()):
        raise SmokeFailed(f"qwen_edge imports from the checkout ({where}), not from an installed wheel")
    log(f"qwen_edge from {Path(where).parent}")

    rows = json.loads(run(qe + ["recipes", "--json"], work).stdout)
    shipped = sorted(p.name for p in (checkout / "export_recipes").glob("*.yaml"))
    if sorted(r["file"] for r in rows) != shipped or {r["origin"] for r in rows} != {"packaged"}:
        raise SmokeFailed(f"recipes --json lists {len(rows)} recipes, not the {len(shipped)} packaged ones")
    log(f"recipes: {len(rows)} packaged")

    run(qe + ["synth", "tiny-qwen2", "-o", "ck"], work)
    arts = {}
    for fmt, quant in (("gguf", "q8_0"), ("onnx", "int4")):
        run(qe + ["export", "ck", "--format", fmt, "--quant", quant, "-o", "dist", "--no-verify"], work)
        arts[fmt] = work / "dist" / f"ck-{fmt}-{quant}"
        manifest = json.loads((arts[fmt] / "manifest.json").read_text(encoding="utf-8"))
        if manifest["target"] != "cpu-x86_64":
            raise SmokeFailed(f"{arts[fmt]}: target {manifest['target']!r}, expected the packaged cpu-x86_64")
    log("export by flags: gguf q8_0, onnx int4 (packaged target cpu-x86_64)")

    name = "qwen2.5-0.5b-instruct.gguf-q8_0.cpu"
    run(qe + ["export", "--recipe", name, "ck", "--set", "model=tiny-qwen2", "--no-verify", "-o", "dist"], work)
    by_recipe = json.loads((work / "dist" / "qwen2.5-0.5b-instruct-gguf-q8_0-cpu" / "manifest.json").read_text())
    if by_recipe["recipe"]["name"] != name:
        raise SmokeFailed(f"export --recipe {name}: manifest names recipe {by_recipe['recipe']!r}")
    log(f"export by packaged recipe name: {name}")

    mine = work / "my-profiles"
    mine.mkdir(exist_ok=True)
    (mine / "tiny-board.yaml").write_text("name: tiny-board\ndevice: cpu\narch: x86_64\nthreads: 1\n"
                                          "max_context: 256\n", encoding="utf-8")
    recipes = work / "my-recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / "tiny.gguf-q4_0.board.yaml").write_text(
        "name: tiny.gguf-q4_0.board\nsource: ck\nmodel: tiny-qwen2\nformat: gguf\nquant: {type: q4_0}\n"
        "target: tiny-board\noutput: tiny-board-q4_0\n", encoding="utf-8")
    env = {"QWEN_EDGE_RUNTIMES_PATH": str(mine)}
    listed = json.loads(run(qe + ["recipes", "--json", "--recipes-dir", str(recipes)], work, env=env).stdout)
    own = [r for r in listed if r["name"] == "tiny.gguf-q4_0.board"]
    if len(listed) != len(rows) + 1 or not own or own[0]["origin"] != "--recipes-dir":
        raise SmokeFailed(f"recipes --recipes-dir: {len(listed)} rows, own recipe {own!r}")
    run(qe + ["export", "--recipe", "tiny.gguf-q4_0.board", "--recipes-dir", str(recipes), "--no-verify",
              "-o", "dist"], work, env=env)
    board = json.loads((work / "dist" / "tiny-board-q4_0" / "manifest.json").read_text())
    if board["target"] != "tiny-board":
        raise SmokeFailed(f"own recipe with own profile: target {board['target']!r}")
    log("own recipe directory and own target profile ($QWEN_EDGE_RUNTIMES_PATH)")

    outs = {}
    for fmt, art in arts.items():
        res = run(qe + ["generate", str(art), "--prompt", "Hello", "--max-new-tokens", "8", "--json"], work)
        outs[fmt] = json.loads(res.stdout)
        if not outs[fmt]["output_ids"]:
            raise SmokeFailed(f"generate {art}: no tokens")
    if outs["gguf"]["prompt_ids"] != outs["onnx"]["prompt_ids"]:
        raise SmokeFailed("generate: the two backends got different prompt ids")
    log(f"generate: {len(outs['gguf']['prompt_ids'])} prompt ids on both backends")

    res = run(qe + ["chat", str(arts["gguf"]), "--max-new-tokens", "8"], work, input="Hi there\n/stats\n/exit\n")
    if "tok/s" not in res.stdout + res.stderr:
        raise SmokeFailed(f"chat: no stats line in {res.stdout[-500:]!r}")
    log("chat: one turn and /stats on stdin")

    ex = work / "api-examples"
    ex.mkdir(exist_ok=True)
    for block in doc_blocks(docs, "bash"):
        for line in block.strip().splitlines():
            args = line.split()
            if args[:1] != ["qwen-edge"]:
                raise SmokeFailed(f"{docs}: unexpected shell line {line!r}")
            run(qe + args[1:], ex)
    blocks = doc_blocks(docs, "python")
    for i, block in enumerate(blocks, 1):
        script = ex / f"example_{i}.py"
        script.write_text(block, encoding="utf-8")
        run([py, str(script)], ex)
    log(f"{docs.name}: {len(blocks)} examples ran")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", required=True, type=Path)
    ap.add_argument("--checkout", required=True, type=Path)
    ap.add_argument("--workdir", required=True, type=Path)
    a = ap.parse_args()
    try:
        smoke(a.docs.resolve(), a.checkout.resolve(), a.workdir.resolve())
    except SmokeFailed as e:
        print(f"smoke failed: {e}", file=sys.stderr)
        return 1
    print("installed smoke: all steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
