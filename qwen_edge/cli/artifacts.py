"""Verbs that make and describe artifacts: synth, export, verify, inspect, recipes, demo."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from ..errors import QwenEdgeError
from ..log import say

Add = Callable[..., argparse.ArgumentParser]

def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _overrides(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise QwenEdgeError(f"override {item!r}: expected key=value (e.g. quant.block_size=64)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_synth(a: argparse.Namespace) -> int:
    from ..model.synth import synth

    path = synth(a.arch, a.output, seed=a.seed)
    say(f"wrote {path}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from ..recipes.recipe_run import run_export

    overrides = _overrides(a.set)
    for key, value in (("quant.imatrix", a.imatrix), ("quant.calibration_text", a.calibration_text),
                       ("quant.awq", "true" if a.awq else None), ("quant.gptq", "true" if a.gptq else None)):
        if value is not None:
            overrides[key] = value
    return run_export(source=a.source, fmt=a.format, quant=a.quant, target=a.target, out_dir=a.output,
                      revision=a.revision,
                      recipe_path=a.recipe, overrides=overrides, name=a.name, verify=a.verify,
                      force=a.force, max_context=a.max_context, recipe_dirs=a.recipes_dir or (),
                      adapters=a.adapter or (), adapter_mode=a.adapter_mode, reference_cache=a.reference_cache)


def cmd_verify(a: argparse.Namespace) -> int:
    if a.on_device:
        if a.reference or a.quick:
            raise QwenEdgeError("verify --on-device compares with the reference logits recorded in the artifact: "
                                "--reference and --quick do not apply")
        from ..quality.verify_device import run_verify_on_device

        return run_verify_on_device(a.artifact, as_json=a.json, threads=a.threads, target=a.target)
    if a.threads or a.target:
        raise QwenEdgeError("--threads and --target apply to verify --on-device only")
    from ..quality.verify import run_verify

    return run_verify(a.artifact, reference=a.reference, as_json=a.json, quick=a.quick,
                      reference_cache=a.reference_cache)


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import inspect, render_inspect

    info = inspect(a.artifact)
    if a.json:
        _print_json(info)
    else:
        print(render_inspect(info))
    return 0


def cmd_recipes(a: argparse.Namespace) -> int:
    from ..recipes.recipe import list_recipes, render_recipes

    rows = list_recipes(a.recipes_dir or ())
    if a.json:
        _print_json(rows)
    else:
        print(render_recipes(rows))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(model=a.model, out_dir=a.output, quick=a.quick)


def _add_recipes_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes-dir", action="append", metavar="DIR",
                   help="also look for recipes in DIR, before $QWEN_EDGE_RECIPES_PATH and the packaged ones "
                   "(repeatable)")


def _formats(value: str) -> str:
    bad = [f for f in value.split(",") if f.strip() not in ("gguf", "onnx")]
    if bad or not value.strip():
        raise argparse.ArgumentTypeError(f"{value!r:.40}: expected gguf, onnx or a comma list of them")
    return value


def _add_reference_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-reference-cache", dest="reference_cache", action="store_false",
                   help="compute the PyTorch reference afresh instead of reading (and writing) the reference cache "
                   "($QWEN_EDGE_REFERENCE_CACHE, else reference/ in the qwen_edge user cache)")


def add_verbs(add: Add) -> None:
    p = add("synth", help="write an architecture-exact checkpoint with random weights (offline)")
    from ..families import MODELS

    p.add_argument("arch", choices=list(MODELS), metavar="ARCH", help="one of: " + ", ".join(MODELS))
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = add("export", help="export a checkpoint to a GGUF or ONNX artifact")
    p.add_argument("source", nargs="?", help="checkpoint directory or hub id, Org/Name[@revision] "
                   "(overrides the recipe's source)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of a hub-id source; the manifest records "
                   "the commit")
    p.add_argument("--format", type=_formats, metavar="gguf|onnx[,...]", help="gguf or onnx; a comma list (with "
                   "--quant's) exports the matrix of the pairs the exporters know, each verified against one reference")
    p.add_argument("--quant", help="gguf: f32 f16 bf16 q8_0 q4_0 q4_k_m q5_k_m q6_k iq4_nl ...; onnx: fp32 fp16 int8 "
                   "int4; a comma list exports each (a matrix: one summary table, exit 1 naming the failures)")
    p.add_argument("--target", help="target profile (cpu-x86_64, arm64-mobile, cuda) or a YAML path")
    p.add_argument("--recipe", help="export recipe: a YAML path, or a name from `qwen-edge recipes`")
    _add_recipes_dir_arg(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted recipe override, e.g. quant.block_size=64")
    p.add_argument("--imatrix", metavar="auto|FILE", help="gguf: importance matrix for 4-bit and below (auto: "
                   "computed over the shipped calibration text and cached; FILE: a llama.cpp imatrix); iq3_xxs and "
                   "iq2_xs need one")
    p.add_argument("--awq", action="store_true", help="4-bit and below: activation-aware per-channel scales folded "
                   "into the preceding norm/projection before quantizing (the float model is unchanged; combines with "
                   "--imatrix)")
    p.add_argument("--gptq", action="store_true", help="4-bit: GPTQ error compensation over the calibration inputs "
                   "(ONNX int4/int8; GGUF Q4_0/Q4_K/Q6_K/IQ4_XS linears and their fallbacks); same types and layout; "
                   "combines with --imatrix")
    p.add_argument("--calibration-text", metavar="FILE", help="with --imatrix auto, --awq or --gptq: the text to calibrate on (.txt, "
                   "or .json like qwen_edge/data/calib_text.json)")
    p.add_argument("--name", help="artifact directory name (default: derived from source, format, quant)")
    p.add_argument("--max-context", type=int, help="context length recorded in the artifact")
    p.add_argument("--adapter", action="append", metavar="ADAPTER", help="PEFT LoRA adapter directory or hub id "
                   "(repeatable, applied in order; replaces the recipe's)")
    p.add_argument("--adapter-mode", choices=["merge", "separate"], help="merge (default): fold the adapter into the "
                   "weights before quantization; separate: base weights unmodified + the adapter beside them (gguf: a llama.cpp "
                   "LoRA GGUF; onnx: an .onnx_adapter for the graph's LoRA inputs, onnxruntime-genai multi-LoRA)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check after export")
    _add_reference_cache_arg(p)
    p.add_argument("--force", action="store_true", help="re-export even when an identical artifact exists")
    p.add_argument("-o", "--output", required=True, help="output directory (the artifact goes in OUTPUT/NAME)")
    p.set_defaults(func=cmd_export)

    p = add("verify", help="check an artifact against the PyTorch reference, or --on-device against its recorded "
            "reference logits (exit 1 on drift)")
    p.add_argument("artifact")
    p.add_argument("--reference", help="reference checkpoint directory or hub id (default: the manifest's source; "
                   "a hub source at its recorded commit)")
    p.add_argument("--quick", action="store_true", help="short evaluation text (for smoke tests)")
    p.add_argument("--on-device", action="store_true", help="no torch: run the artifact on this machine's runtime "
                   "against the reference logits recorded when it was verified; the same gates")
    p.add_argument("--threads", type=int, help="with --on-device: CPU threads (default: the target's)")
    p.add_argument("--target", help="with --on-device: target profile (default: this machine's)")
    _add_reference_cache_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = add("inspect", help="describe an artifact or a bare .gguf/.onnx file")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = add("recipes", help="list the export recipes (packaged, plus any directory you name)")
    p.add_argument("--json", action="store_true")
    _add_recipes_dir_arg(p)
    p.set_defaults(func=cmd_recipes)

    p = add("demo", help="synthesize Qwen2.5-0.5B, export GGUF and ONNX, verify, chat, bench")
    p.add_argument("--model", help="run on this checkpoint instead of a synthesized one")
    p.add_argument("-o", "--output", default="qwen-edge-demo", help="working directory (default ./qwen-edge-demo)")
    p.add_argument("--quick", action="store_true", help="tiny model, for a smoke test")
    p.set_defaults(func=cmd_demo)
