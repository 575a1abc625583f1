"""Hub sources end to end: `Org/Name[@rev]` resolved once through a real Hugging Face cache, offline.

Each test builds a hub cache in tmp_path the way huggingface_hub lays it out (`models--Org--Name/blobs/<id>`,
`snapshots/<commit>/<file>` symlinks into blobs, `refs/<branch or tag>` holding the commit), points HF_HOME at it,
sets HF_HUB_OFFLINE=1, and runs the real CLI: huggingface_hub itself resolves the ids, nothing touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import requires_torch

REPO = "qwen-edge-test/tiny-qwen3"
MISSING = "qwen-edge-test/not-downloaded"
COMMIT_A = hashlib.sha1(b"qwen-edge test commit a").hexdigest()
COMMIT_B = hashlib.sha1(b"qwen-edge test commit b").hexdigest()
COMMIT_C = hashlib.sha1(b"qwen-edge test commit c").hexdigest()


def _blob_id(path: Path, data: bytes) -> str:
    """The hub names a blob by its LFS sha256 (weights) or its git blob sha1 (small text files)."""
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_snapshot(cache: Path, repo_id: str, ckpt: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """Put checkpoint `ckpt` into the hub cache `cache` as `repo_id` at `commit`; `refs` (e.g. main, v1) point at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(ckpt.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / _blob_id(f, data)
        if not blob.exists():
            blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        set_ref(cache, repo_id, ref, commit)
    return snap


def set_ref(cache: Path, repo_id: str, ref: str, commit: str) -> None:
    p = cache / ("models--" + repo_id.replace("/", "--")) / "refs" / ref
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(commit)  # no newline: huggingface_hub writes (and reads) the bare hash


@dataclass
class Hub:
    home: Path
    cache: Path
    snap_a: Path
    snap_b: Path
    ckpt_a: Path
    ckpt_b: Path


@pytest.fixture
def hub(tmp_path, synth_ckpt, monkeypatch) -> Hub:
    """REPO with commits A (refs/main; tiny-qwen3 seed 0) and B (refs/v1; seed 1) under HF_HOME, offline."""
    home = tmp_path / "hf-home"
    cache = home / "hub"  # huggingface_hub's default cache under HF_HOME
    a, b = synth_ckpt("tiny-qwen3", 0), synth_ckpt("tiny-qwen3", 1)
    snap_a = add_snapshot(cache, REPO, a, COMMIT_A, refs=("main",))
    snap_b = add_snapshot(cache, REPO, b, COMMIT_B, refs=("v1",))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return Hub(home, cache, snap_a, snap_b, a, b)


def _weights_sha(ckpt: Path) -> str:
    from qwen_edge.model.checkpoint import Checkpoint

    c = Checkpoint(ckpt, validate=False)
    try:
        return c.weights_sha256
    finally:
        c.close()


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    return r.stderr


RECIPE = """\
name: tiny-qwen3.gguf-q8_0.cpu
source: {source}
model: tiny-qwen3
format: gguf
quant:
  type: q8_0
target: cpu-x86_64
max_context: 1024
verify:
  quick: true
output: {output}
"""


def write_recipe(tmp_path: Path, source: str, output: str = "tiny-hub", extra: str = "") -> Path:
    p = tmp_path / f"{output}.yaml"
    p.write_text(RECIPE.format(source=source, output=output) + extra)
    return p


# --- the cache layout itself ------------------------------------------------------------------------------------------
def test_the_test_cache_resolves_through_huggingface_hub_offline(hub):
    """huggingface_hub's own snapshot_download finds both commits offline: by branch, by tag, by commit hash."""
    from huggingface_hub import snapshot_download

    def snap(rev=None):
        return Path(snapshot_download(REPO, revision=rev, cache_dir=hub.cache, local_files_only=True))

    assert snap() == hub.snap_a and snap("main") == hub.snap_a
    assert snap("v1") == hub.snap_b and snap(COMMIT_B) == hub.snap_b
    assert (snap() / "config.json").resolve().parent == hub.cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO, revision="nope", cache_dir=hub.cache, local_files_only=True)


def test_split_hub_id():
    from qwen_edge.model.checkpoint import split_hub_id

    assert split_hub_id("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    assert split_hub_id(f"Org/Name@{COMMIT_A}") == ("Org/Name", COMMIT_A)
    assert split_hub_id("Org/Name@refs/pr/3") == ("Org/Name", "refs/pr/3")
    for not_an_id in ("Name", "a/b/c", "Org/Name@", "/abs/dir", "Org/", "-x/y", "Org/Na me"):
        assert split_hub_id(not_an_id) is None, not_an_id


# --- export + verify from a hub id ------------------------------------------------------------------------------------
@requires_torch
def test_recipe_with_a_hub_id_exports_and_verifies_in_one_command(hub, cli, tmp_path):
    recipe = write_recipe(tmp_path, REPO)
    out = tmp_path / "dist"
    r = cli("export", "--recipe", str(recipe), "-o", str(out))
    assert r.returncode == 0, r.stderr
    announce, summary = r.stderr.strip().splitlines()
    assert "then verify it" in announce and "verify passed" in summary and "exported in" in summary
    art = out / "tiny-hub"
    m = _manifest(art)
    assert m["source"]["hub_id"] == REPO and m["source"]["commit"] == COMMIT_A
    assert m["source"]["revision"] is None and m["source"]["path"] == REPO
    assert m["source"]["weights_sha256"] == _weights_sha(hub.ckpt_a)
    assert str(hub.home) not in json.dumps(m["source"])  # the cache location is this machine's, not the artifact's
    parity = m["parity"]
    assert parity["passed"] is True and parity["reference_matches_source"] is True
    assert parity["reference"] == str(hub.snap_a)

    # unchanged id and commit: skipped, the recorded pass reused
    again = cli("export", "--recipe", str(recipe), "-o", str(out))
    assert again.returncode == 0, again.stderr
    assert "up to date, export skipped" in again.stderr and "passed (recorded" in again.stderr

    # main moves to a commit with the same files (say, a README edit): rebuilt, so the manifest names that commit
    snap_c = add_snapshot(hub.cache, REPO, hub.ckpt_a, COMMIT_C, refs=("main",))
    same = cli("export", "--recipe", str(recipe), "-o", str(out))
    assert same.returncode == 0, same.stderr
    assert "exported in" in same.stderr and "verify passed" in same.stderr
    m = _manifest(art)
    assert m["source"]["commit"] == COMMIT_C and m["source"]["weights_sha256"] == _weights_sha(hub.ckpt_a)
    assert m["parity"]["reference"] == str(snap_c)

    # main moves to commit B (other weights): the same recipe now resolves to B, rebuilds and verifies against B
    set_ref(hub.cache, REPO, "main", COMMIT_B)
    moved = cli("export", "--recipe", str(recipe), "-o", str(out))
    assert moved.returncode == 0, moved.stderr
    assert "exported in" in moved.stderr and "verify passed" in moved.stderr
    m = _manifest(art)
    assert m["source"]["commit"] == COMMIT_B and m["source"]["weights_sha256"] == _weights_sha(hub.ckpt_b)
    assert m["parity"]["reference"] == str(hub.snap_b) and m["parity"]["reference_matches_source"] is True


@requires_torch
def test_verify_alone_finds_the_reference_from_the_manifest(hub, cli, tmp_path):
    out = tmp_path / "dist"
    r = cli("export", REPO, "--format", "gguf", "--quant", "q8_0", "--no-verify", "-o", str(out))
    assert r.returncode == 0, r.stderr
    art = out / "tiny-qwen3-gguf-q8_0"  # named after the repository, not the cache path
    assert _manifest(art)["source"]["commit"] == COMMIT_A

    # main moves on: verify still takes the commit the artifact was exported from
    set_ref(hub.cache, REPO, "main", COMMIT_B)
    v = cli("verify", str(art), "--quick", "--json")
    assert v.returncode == 0, v.stderr
    report = json.loads(v.stdout)
    assert report["passed"] is True and report["reference"] == str(hub.snap_a)
    assert report["reference_matches_source"] is True

    # --reference still overrides (here: the other commit's weights, which the report flags)
    o = cli("verify", str(art), "--quick", "--json", "--reference", str(hub.ckpt_b))
    assert o.returncode in (0, 1), o.stderr
    report = json.loads(o.stdout)
    assert report["reference"] == str(hub.ckpt_b) and report["reference_matches_source"] is False

    # the snapshot is gone and we are offline: one line naming the id, the commit and the way out
    shutil.rmtree(hub.snap_a)
    gone = _one_line_error(cli("verify", str(art), "--quick"))
    assert REPO in gone and COMMIT_A in gone and "--reference" in gone


@requires_torch
def test_commit_and_tag_revisions(hub, cli, tmp_path):
    out = tmp_path / "dist"
    # Org/Name@commit: exported and verified against that commit, not main
    r = cli("export", f"{REPO}@{COMMIT_B}", "--format", "gguf", "--quant", "q8_0", "--set", "verify.quick=true",
            "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "verify passed" in r.stderr
    m = _manifest(out / "tiny-qwen3-gguf-q8_0")
    assert (m["source"]["hub_id"], m["source"]["revision"], m["source"]["commit"]) == (REPO, COMMIT_B, COMMIT_B)
    assert m["source"]["weights_sha256"] == _weights_sha(hub.ckpt_b)
    assert m["parity"]["reference"] == str(hub.snap_b) and m["parity"]["reference_matches_source"] is True

    # --revision TAG on the command line, and `revision:` in a recipe, resolve to the tag's commit
    r = cli("export", REPO, "--revision", "v1", "--format", "gguf", "--quant", "q8_0", "--no-verify", "--name", "tag",
            "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert {k: _manifest(out / "tag")["source"][k] for k in ("revision", "commit")} == {"revision": "v1",
                                                                                          "commit": COMMIT_B}
    recipe = write_recipe(tmp_path, REPO, "in-recipe", extra="revision: v1\n")
    r = cli("export", "--recipe", str(recipe), "--no-verify", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert _manifest(out / "in-recipe")["source"]["commit"] == COMMIT_B
    recipe = write_recipe(tmp_path, f"{REPO}@v1", "suffix")
    r = cli("export", "--recipe", str(recipe), "--no-verify", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert _manifest(out / "suffix")["source"]["revision"] == "v1"


# --- bad input: one line, exit 2 --------------------------------------------------------------------------------------
def test_unknown_revisions_and_missing_ids_are_one_line_errors(hub, cli, tmp_path):
    out = str(tmp_path / "dist")
    flags = ["--format", "gguf", "--quant", "q8_0", "--no-verify", "-o", out]
    e = _one_line_error(cli("export", f"{REPO}@nope", *flags))
    assert "unknown revision 'nope'" in e and REPO in e and "HF_HUB_OFFLINE" in e
    e = _one_line_error(cli("export", REPO, "--revision", "nope", *flags))
    assert "unknown revision 'nope'" in e
    e = _one_line_error(cli("export", MISSING, *flags))
    assert MISSING in e and "not in the Hugging Face cache" in e and str(hub.cache) in e and "HF_HUB_OFFLINE" in e
    e = _one_line_error(cli("export", f"{REPO}@{COMMIT_A}", "--revision", "v1", *flags))
    assert "two revisions" in e
    e = _one_line_error(cli("export", str(hub.ckpt_a), "--revision", "main", *flags))
    assert "local directory has no revision" in e
    e = _one_line_error(cli("export", f"{REPO}@../../../etc", *flags))
    assert "invalid revision" in e
    recipe = write_recipe(tmp_path, f"{REPO}@{COMMIT_A}", extra="revision: v1\n")
    e = _one_line_error(cli("export", "--recipe", str(recipe), "-o", out))
    assert "two revisions" in e and str(recipe) in e
    recipe = write_recipe(tmp_path, str(hub.ckpt_a), "local", extra="revision: v1\n")
    e = _one_line_error(cli("export", "--recipe", str(recipe), "-o", out))
    assert "'revision' needs a hub id" in e
    recipe = write_recipe(tmp_path, MISSING, "missing")
    e = _one_line_error(cli("export", "--recipe", str(recipe), "-o", out))
    assert "not in the Hugging Face cache" in e
    assert not Path(out).exists() or not any(Path(out).iterdir())  # nothing half-written


def test_the_recipe_matrix_carries_the_revision(cli):
    """`qwen-edge recipes --json` rows name the revision, so a CI cache key can include it."""
    r = cli("recipes", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows and all("revision" in row and "source" in row for row in rows)


@requires_torch
def test_an_artifact_from_before_hub_ids_were_recorded_still_verifies(hub, cli, tmp_path):
    """A manifest whose source is only `path: Org/Name` (the old record) resolves the id's default branch."""
    from qwen_edge.model.artifact import MANIFEST, write_json

    out = tmp_path / "dist"
    r = cli("export", REPO, "--format", "gguf", "--quant", "q8_0", "--no-verify", "-o", str(out))
    assert r.returncode == 0, r.stderr
    art = out / "tiny-qwen3-gguf-q8_0"
    m = _manifest(art)
    for k in ("hub_id", "revision", "commit"):
        del m["source"][k]
    write_json(art / MANIFEST, m)  # the manifest is not among its own hashed files
    v = cli("verify", str(art), "--quick", "--json")
    assert v.returncode == 0, v.stderr
    report = json.loads(v.stdout)
    assert report["reference"] == str(hub.snap_a) and report["reference_matches_source"] is True
