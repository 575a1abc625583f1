"""Hostile recipes: unsafe YAML, alias bombs, wrong types and output names that try to leave the output dir."""

from __future__ import annotations

from pathlib import Path

import pytest

import hostile

BASE = """name: r
source: {src}
model: tiny-qwen2
format: gguf
quant:
  type: f16
target: cpu-x86_64
verify:
  enabled: false
"""

CASES = {
    "output-dotdot": "output: ../escape",
    "output-deep-dotdot": "output: a/../../escape",
    "output-absolute": "output: {tmp}/escape",
    "output-slash": "output: a/b",
    "output-dot": "output: '.'",
    "output-dotdot-only": "output: '..'",
    "output-nul": "output: \"x\\0y\"",
    "output-list": "output: [a]",
    "python-object": "extra: !!python/object/apply:os.system ['touch {tmp}/pwned']",
    "python-name": "quant: !!python/name:os.system",
    "format-unknown": "format: pickle",
    "quant-int": "quant: 5",
    "quant-type-unknown": "quant:\n  type: q1_z",
    "max-context-string": "max_context: lots",
    "max-context-negative": "max_context: -5",
    "max-context-nan": "max_context: .nan",
    "unknown-key": "evil: true",
    "target-missing": "target: no-such-profile",
    "block-size-silly": "quant:\n  type: f16\n  block_size: 7",
}


def _recipe(tmp: Path, case: str, src: Path) -> Path:
    text = BASE.format(src=src) + CASES[case].format(tmp=tmp) + "\n"
    p = tmp / f"{case}.yaml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def ckpt(synth_ckpt) -> Path:
    hostile.require_module("qwen_edge.recipes.recipe")
    return synth_ckpt("tiny-qwen2")


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_recipe_rejected(ckpt, tmp_path, case):
    out = tmp_path / "out"
    hostile.expect_cli_rejected(f"recipe/{case}", "export", "--recipe", str(_recipe(tmp_path, case, ckpt)),
                                "-o", str(out), "--no-verify")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "pwned").exists()
    assert not out.exists() or not any(out.iterdir())


def test_alias_bomb(ckpt, tmp_path):
    """A billion-laughs YAML neither hangs nor eats memory: rejected within the CLI timeout."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text(BASE.format(src=ckpt) + "\n".join(lines) + "\n")
    hostile.expect_cli_rejected("recipe/alias-bomb", "export", "--recipe", str(p), "-o", str(tmp_path / "o"),
                                "--no-verify", timeout=60)


@pytest.mark.parametrize("case", ["deep", "not-mapping", "binary", "empty"])
def test_malformed_recipe_files(ckpt, tmp_path, case):
    p = tmp_path / "r.yaml"
    data = {
        "deep": ("[" * 50_000 + "]" * 50_000).encode(),
        "not-mapping": b"- a\n- b\n",
        "binary": b"\xff\xfe\x00name: r\n",
        "empty": b"",
    }[case]
    p.write_bytes(data)
    hostile.expect_cli_rejected(f"recipe/file-{case}", "export", "--recipe", str(p), "-o", str(tmp_path / "o"),
                                "--no-verify")


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", "."])
def test_name_flag_cannot_escape(ckpt, tmp_path, name):
    out = tmp_path / "out"
    hostile.expect_cli_rejected("recipe/name-flag", "export", str(ckpt), "--format", "gguf", "--quant", "f16",
                                "--name", name, "-o", str(out), "--no-verify")
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("kind,data", [("binary", b"\x00\xff\xfe not text"), ("deep", b"a: " + b"[" * 5000),
                                       ("list", b"- 1\n- 2\n"), ("bad-threads", b"name: p\nthreads: many\n")])
def test_hostile_target_profile_from_the_search_path(cli, synth_ckpt, tmp_path, kind, data):
    """A profile found by name along $QWEN_EDGE_RUNTIMES_PATH that is not a valid profile: one error line, exit 2."""
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof" / "p.yaml").write_bytes(data)
    r = cli("export", str(synth_ckpt("tiny-qwen2")), "--format", "gguf", "--quant", "q8_0", "--target", "p",
            "--no-verify", "-o", str(tmp_path / "out"), env={"QWEN_EDGE_RUNTIMES_PATH": str(tmp_path / "prof")})
    ok = r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 \
        and "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert hostile.record(f"profile/{kind}", ok), r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
