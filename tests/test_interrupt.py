"""Interrupted and failing exports: SIGKILL at any moment, disk full, unwritable output; never a partial artifact."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hostile
from qwen_edge.model.artifact import Artifact
from qwen_edge.errors import QwenEdgeError

WRITE_PHASES = {"first-bytes": 0.0, "half-written": 0.5}
"""Kill once `.m.tmp-*/model.gguf` holds more than this fraction of the finished file (and less than all of it):
the writer is caught mid-write, not in the imports before it or in the commit after it."""
ATTEMPTS = 5
"""A writer that finishes the file between two polls is not caught mid-write: that attempt is retried."""


def _export_cmd(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qwen_edge.cli", "export", str(ckpt), "--format", "gguf", "--quant", "f16",
            "-o", str(out), "--name", "m", "--no-verify", *extra]


def _state(out: Path) -> str:
    """'absent' or 'complete' (Artifact.open passes, every sha256 checked); anything else fails the test."""
    final = out / "m"
    if not final.exists():
        return "absent"
    Artifact.open(final)  # raises on a partial or corrupt artifact
    return "complete"


def _kill_after(cmd: list[str], delay: float) -> int:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    return p.wait(timeout=60)


def _kill_mid_write(cmd: list[str], out: Path, full_size: int, fraction: float) -> dict[str, object]:
    """Run an export and SIGKILL it while `.m.tmp-*/model.gguf` is partly written; prove the kill landed there.

    The process is stopped (SIGSTOP) as soon as a partial model file is seen, the file is measured while nothing
    can write it, and only then killed: the returned evidence holds the temporary directory and the size the
    file had when the kill landed. Retried (a fresh export) when the writer outran the poll; fails after
    ATTEMPTS tries, so a kill before or after the write can never pass as a kill mid-write.
    """
    seen: list[str] = []
    for attempt in range(ATTEMPTS):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        evidence = None
        try:
            while p.poll() is None and evidence is None:
                for model in (out.glob(".m.tmp-*/model.gguf") if out.is_dir() else ()):
                    try:
                        size = model.stat().st_size
                    except OSError:
                        continue
                    if fraction * full_size < size < full_size:
                        p.send_signal(signal.SIGSTOP)
                        _, status = os.waitpid(p.pid, os.WUNTRACED)  # returns once it is stopped (or dead)
                        if not os.WIFSTOPPED(status):
                            p.returncode = os.waitstatus_to_exitcode(status)
                            break
                        try:
                            size = model.stat().st_size  # the writer is stopped: the size the kill meets
                        except OSError:
                            size = -1
                        if fraction * full_size < size < full_size:
                            evidence = {"tmp": model.parent, "size": size, "attempt": attempt}
                        else:
                            p.send_signal(signal.SIGCONT)
                            seen.append(f"attempt {attempt}: stopped too late ({size} of {full_size} bytes)")
                        break
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            rc = p.wait(timeout=60)
        if evidence is not None:
            assert rc == -signal.SIGKILL, f"the export was not killed by the signal (exit {rc})"
            return evidence
        seen.append(f"attempt {attempt}: export ended (exit {rc}) before a partial model file was seen")
    pytest.fail("never caught the export mid-write: " + "; ".join(seen))


@pytest.fixture(scope="module")
def ckpt(synth_ckpt) -> Path:
    hostile.require_module("qwen_edge.recipes.recipe")
    return synth_ckpt("tiny-qwen2")


@pytest.fixture(scope="module")
def previous(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prev")
    r = subprocess.run(_export_cmd(ckpt, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def full_size(previous) -> int:
    return (previous / "m" / "model.gguf").stat().st_size


@pytest.mark.parametrize("phase", sorted(WRITE_PHASES))
def test_killed_export_leaves_nothing(ckpt, full_size, tmp_path, phase):
    """SIGKILL while model.gguf is partly written in `.m.tmp-*`: no artifact appears under the final name."""
    out = tmp_path / "out"
    ev = _kill_mid_write(_export_cmd(ckpt, out), out, full_size, WRITE_PHASES[phase])
    model = ev["tmp"] / "model.gguf"
    left = model.stat().st_size if model.exists() else None
    clean = _state(out) == "absent" and left == ev["size"]  # the partial file stayed in the temporary directory
    assert hostile.record("interrupt/kill-fresh", clean), (_state(out), ev, left, full_size)


@pytest.mark.parametrize("phase", sorted(WRITE_PHASES))
def test_killed_reexport_keeps_previous(ckpt, previous, full_size, tmp_path, phase):
    """SIGKILL of a re-export mid-write over an existing artifact: the previous artifact survives, byte for byte."""
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    before = (out / "m" / "manifest.json").read_bytes()
    ev = _kill_mid_write(_export_cmd(ckpt, out, "--force"), out, full_size, WRITE_PHASES[phase])
    clean = _state(out) == "complete" and (out / "m" / "manifest.json").read_bytes() == before
    assert hostile.record("interrupt/kill-reexport", clean), (ev, sorted(p.name for p in out.iterdir()))


def test_stale_temporaries_are_cleaned(ckpt, tmp_path):
    """What a killed export leaves (`.m.tmp-PID-*`, `.m.old-PID`) is removed by the next export of that name."""
    out = tmp_path / "out"
    for delay in (0.8, 1.4):
        _kill_after(_export_cmd(ckpt, out), delay)
    dead = out / ".m.tmp-999999999-abc"
    dead.mkdir(parents=True)
    alive = out / f".m.tmp-{os.getpid()}-abc"
    alive.mkdir()
    r = subprocess.run(_export_cmd(ckpt, out, "--force"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _state(out) == "complete"
    left = sorted(p.name for p in out.iterdir() if p.name != "m")
    assert left == [alive.name], left


def test_writer_exception_leaves_nothing(tmp_path):
    """An exception inside the writer (Ctrl-C, a bug) removes the temporary directory."""
    from qwen_edge.model.artifact import ArtifactWriter

    with pytest.raises(KeyboardInterrupt):
        with ArtifactWriter(tmp_path / "m") as w:
            (w.dir / "model.gguf").write_bytes(b"x" * 100)
            raise KeyboardInterrupt
    left = list(tmp_path.iterdir())
    assert hostile.record("interrupt/exception-in-writer", left == []), f"left behind: {left}"


def test_file_size_limit_reported(ckpt, tmp_path):
    """Writes failing mid-way (RLIMIT_FSIZE: EFBIG, like a full disk) give exit 2, one line, nothing left."""
    out = tmp_path / "out"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    hostile.TRIED["interrupt/file-too-large"] += 1
    r = subprocess.run(_export_cmd(ckpt, out), capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    *said, last = r.stderr.strip().splitlines()  # at most the announcement of what export does, then the error
    assert "Traceback" not in r.stderr and last.startswith("error: ") and len(said) <= 1, r.stderr
    assert "internal error" not in r.stderr, r.stderr
    assert _state(out) == "absent"
    assert not [p for p in out.iterdir() if p.name.startswith(".m.tmp")], "temporary directory left behind"
    hostile.REJECTED["interrupt/file-too-large"] += 1


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_reported(ckpt, tiny_fs):
    out = tiny_fs / "out"
    hostile.TRIED["interrupt/disk-full"] += 1
    r = subprocess.run(_export_cmd(ckpt, out), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    *said, last = r.stderr.strip().splitlines()  # at most the announcement of what export does, then the error
    assert "Traceback" not in r.stderr and last.startswith("error: ") and len(said) <= 1, r.stderr
    assert "internal error" not in r.stderr and "No space" in r.stderr, r.stderr
    assert _state(out) == "absent"
    assert not [p for p in out.iterdir() if p.name.startswith(".m.")], "temporary directory left behind"
    hostile.REJECTED["interrupt/disk-full"] += 1


def test_output_parent_is_a_file(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    hostile.expect_cli_rejected("interrupt/output-under-file", "export", str(ckpt), "--format", "gguf", "--quant",
                                "f16", "-o", str(blocker / "out"), "--no-verify")


def test_output_is_a_file(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    hostile.expect_cli_rejected("interrupt/output-is-file", "export", str(ckpt), "--format", "gguf", "--quant",
                                "f16", "-o", str(blocker), "--no-verify")


def test_readonly_output_dir(ckpt, tmp_path):
    """A read-only output directory (root ignores mode bits, so a read-only bind/tmpfs is used when possible)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip("running as root without mount: permission bits do not stop writes")
        ro.chmod(0o500)
    try:
        hostile.expect_cli_rejected("interrupt/readonly-output", "export", str(ckpt), "--format", "gguf", "--quant",
                                    "f16", "-o", str(ro), "--no-verify")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
        ro.chmod(0o700)


def test_unreadable_checkpoint_reported(tmp_path):
    """A checkpoint whose weights cannot be read (a directory where the file should be) is exit 2."""
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    hostile.expect_cli_rejected("interrupt/bad-source", "export", str(d), "--format", "gguf", "--quant", "f16",
                                "-o", str(tmp_path / "o"), "--no-verify")
    with pytest.raises(QwenEdgeError):
        from qwen_edge.model.checkpoint import Checkpoint

        Checkpoint(d)
