"""What the CLI prints on stderr: -q errors only, -v llama.cpp's own log, progress bars on a terminal only."""

from __future__ import annotations

import os
import sys

import pytest

from test_chat_cli import Pty


def test_quiet_prints_nothing_but_errors(cli, synth_ckpt, tmp_path):
    loud = cli("synth", "tiny-qwen2", "-o", str(tmp_path / "a"))
    assert loud.returncode == 0 and "wrote" in loud.stderr
    quiet = cli("-q", "synth", "tiny-qwen2", "-o", str(tmp_path / "b"))
    assert quiet.returncode == 0 and quiet.stderr == ""
    exp = cli("export", str(tmp_path / "b"), "--format", "gguf", "--quant", "q8_0", "-o", str(tmp_path / "d"),
              "--no-verify", "-q")
    assert exp.returncode == 0 and exp.stderr == ""
    gen = cli("generate", str(tmp_path / "d" / "b-gguf-q8_0"), "--prompt", "Hi", "--max-new-tokens", "3", "-q")
    assert gen.returncode == 0 and gen.stderr == "" and gen.stdout != ""  # stdout keeps the reply
    loud_gen = cli("generate", str(tmp_path / "d" / "b-gguf-q8_0"), "--prompt", "Hi", "--max-new-tokens", "3")
    assert "tok/s" in loud_gen.stderr  # the timing line -q hid
    bad = cli("-q", "export", str(tmp_path / "missing"), "--format", "gguf", "--quant", "q8_0", "-o", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    both = cli("-q", "-v", "recipes")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_verbose_passes_llama_cpp_log_through(cli, exported):
    art = exported("tiny-qwen2", "gguf", "q8_0")
    plain = cli("generate", str(art), "--prompt", "Hi", "--max-new-tokens", "2")
    assert plain.returncode == 0 and "qwen_edge.llama_cpp:" not in plain.stderr
    loud = cli("generate", str(art), "--prompt", "Hi", "--max-new-tokens", "2", "-v")
    assert loud.returncode == 0, loud.stderr
    assert "qwen_edge.llama_cpp: llama_model_loader" in loud.stderr  # llama.cpp's own log, line by line


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_progress_bars_on_a_terminal_not_when_piped(cli, synth_ckpt, tmp_path):
    ck = str(synth_ckpt("tiny-qwen2"))
    args = ["export", ck, "--format", "gguf", "--quant", "f16", "--no-verify", "--force"]
    piped = cli(*args, "-o", str(tmp_path / "piped"))
    assert piped.returncode == 0 and "write GGUF" not in piped.stderr and "\r" not in piped.stderr
    t = Pty([sys.executable, "-m", "qwen_edge.cli", *args, "-o", str(tmp_path / "tty")],
            dict(os.environ, TERM="xterm", COLUMNS="100"))
    t.expect("exported in")
    assert t.close() == 0
    assert "write GGUF" in t.raw and "tensor" in t.raw  # tqdm's bar, drawn on the terminal
    t = Pty([sys.executable, "-m", "qwen_edge.cli", "export", ck, "--format", "onnx", "--quant", "int4", "--no-verify",
             "-o", str(tmp_path / "tty")], dict(os.environ, TERM="xterm"))
    t.expect("exported in")
    assert t.close() == 0 and "write ONNX" in t.raw and "layer" in t.raw
    art = str(tmp_path / "tty" / f"{os.path.basename(ck)}-onnx-int4")
    piped = cli("bench", art, "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "2", "--warmup", "0",
                "--threads", "1")
    assert piped.returncode == 0 and "bench:" not in piped.stderr and "\r" not in piped.stderr
    t = Pty([sys.executable, "-m", "qwen_edge.cli", "bench", art, "--prompt-tokens", "8", "--gen-tokens", "4",
             "--repeat", "2", "--warmup", "0", "--threads", "1"], dict(os.environ, TERM="xterm"))
    t.expect("2/2")  # the bar's count after the second run
    assert t.close() == 0 and "bench: " in t.raw and "run/s" in t.raw
