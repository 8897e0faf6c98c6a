"""Crash-safe writes: a writing process killed at any moment leaves no partial checkpoint.

A real ``n2n widen`` process writing a ~100 MB student is killed with SIGKILL at random moments
(some while its temporary file is being written, some anywhere in its run). Afterwards:

* the destination is absent, or the previous complete file, or the complete new file
  (byte-identical to an uninterrupted run: same seed, same bytes) -- never a partial file;
* the input checkpoint is untouched (same bytes, same modification time);
* the only other thing that may remain is the killed writer's temporary file
  ``.NAME.XXXXXXXX.tmp`` beside the destination: a SIGKILLed process cannot remove it, and the
  next run neither reads nor needs it (docs/errors.md#interrupted-writes: safe to delete).

Also here: writing over an input is refused unless ``--overwrite-input``; a missing output
folder is a clear error; both are checked before any work is written.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import n2nsurgery as n2n
from conftest import example_paths, n2n_exe
from n2nsurgery.cli import app

BIG_YAML = """format: n2n-arch/1
name: big-mlp
inputs:
  x: {shape: [2048], dtype: float32}
nodes:
  - {name: fc1, op: linear, in: x}
  - {name: relu1, op: relu, in: fc1}
  - {name: fc2, op: linear, in: relu1}
  - {name: relu2, op: relu, in: fc2}
  - {name: fc3, op: linear, in: relu2}
outputs: [fc3]
"""
HIDDEN = 6144  # fc1.weight and fc2.weight: 6144 x 2048 float32 each, ~50 MB apiece


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A ~100 MB teacher (checkpoint, architecture) and the digest of an uninterrupted widening
    (computed in this process: same seed, same bytes, whichever process writes them)."""
    from n2nsurgery.widen import widen

    folder = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    sd = {
        "fc1.weight": torch.randn(HIDDEN, 2048, generator=g) / 45,
        "fc1.bias": torch.randn(HIDDEN, generator=g) / 10,
        "fc2.weight": torch.randn(2048, HIDDEN, generator=g) / 78,
        "fc2.bias": torch.randn(2048, generator=g) / 10,
        "fc3.weight": torch.randn(10, 2048, generator=g) / 45,
        "fc3.bias": torch.zeros(10),
    }
    ckpt, arch = folder / "teacher.safetensors", folder / "teacher.yaml"
    save_file(sd, str(ckpt), metadata={"format": "pt"})
    arch.write_text(BIG_YAML)
    student, _ = widen(n2n.load_model(str(ckpt), str(arch)), "fc1", WIDTH, seed=SEED)
    expected = folder / "expected" / "out.safetensors"
    expected.parent.mkdir()
    n2n.save_model(student, str(expected))
    return {"ckpt": ckpt, "arch": arch, "expected": sha(expected), "expected_path": expected}


WIDTH, SEED = HIDDEN + 1024, 7


def _widen_cmd(ckpt, arch, out, *extra) -> list:
    return [n2n_exe(), "-q", "widen", str(ckpt), "--arch", str(arch), "--layer", "fc1", "--width", str(WIDTH),
            "--seed", str(SEED), "--no-verify", "-o", str(out), *extra]


def _temp_files(folder, name: str) -> list:
    pattern = re.compile(r"^\." + re.escape(name) + r"\..+\.tmp$")
    return [n for n in os.listdir(folder) if pattern.match(n)]


def _kill_at(cmd, folder, name: str, delay: float, after_temp: bool, limit: float = 120) -> tuple:
    """Start `cmd`; SIGKILL it `delay` s after its temporary file appears (or after the start).

    Returns ('killed' or 'finished', seconds from the start to the kill or the end).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    try:
        if after_temp:
            while proc.poll() is None and not _temp_files(folder, name) and time.monotonic() - start < limit:
                time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is not None:
            return "finished", time.monotonic() - start
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        return "killed", time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _dest_state(big, folder, dest, previous, input_state) -> str:
    """Check the invariants; return what the destination holds: 'absent', 'previous' or 'new'."""
    assert (sha(big["ckpt"]), os.stat(big["ckpt"]).st_mtime_ns) == input_state, "the input checkpoint changed"
    leftovers = set(os.listdir(folder)) - {dest.name}
    assert leftovers <= set(_temp_files(folder, dest.name)), f"unexpected files after a kill: {leftovers}"
    if not dest.exists():
        assert previous is None, "the previous output was removed"
        return "absent"
    digest = sha(dest)
    if digest == previous:
        return "previous"
    assert digest == big["expected"], "the destination holds a partial or different file"
    load_file(str(dest))  # and it reads as a whole checkpoint
    return "new"


@pytest.mark.slow
def test_sigkill_while_writing_leaves_no_partial_file(big, tmp_path):
    """Three kills (two while the temporary file is being written, one anywhere in the run), the
    first over an older complete output; then an uninterrupted run beside what they left."""
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(open(example_paths("mlp")[0], "rb").read())  # an older, complete output
    input_state = (sha(big["ckpt"]), os.stat(big["ckpt"]).st_mtime_ns)
    rng = random.Random(1234)
    outcomes = []
    # The first kill follows the temporary file's appearance at once, so at least one always lands
    # mid-write however fast the machine; the others are random.
    for after_temp, delay in [(True, 0.0), (True, rng.uniform(0, 0.3)), (False, rng.uniform(0.3, 5))]:
        previous = sha(dest) if dest.exists() else None
        what, when = _kill_at(_widen_cmd(big["ckpt"], big["arch"], dest), tmp_path, dest.name, delay, after_temp)
        outcomes.append((what, round(when, 2), _dest_state(big, tmp_path, dest, previous, input_state)))
    assert any(o[0] == "killed" for o in outcomes), f"no kill landed: {outcomes}"
    stale = _temp_files(tmp_path, dest.name)
    done = subprocess.run(_widen_cmd(big["ckpt"], big["arch"], dest), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert sha(dest) == big["expected"], "an uninterrupted run beside stale temporary files"
    assert _temp_files(tmp_path, dest.name) == stale  # not ours to delete: another run may own one


@pytest.mark.slow
def test_sigkill_while_writing_a_sharded_checkpoint(big, tmp_path):
    """A sharded output is written into a temporary folder renamed into place: after a kill the
    destination folder is absent or complete (every shard and the index, the widened tensors)."""
    dest = tmp_path / "student"
    expected = load_file(str(big["expected_path"]))
    for delay in (0.05, 0.4):
        if dest.exists():
            shutil.rmtree(dest)
        cmd = _widen_cmd(big["ckpt"], big["arch"], dest, "--max-shard-size", "30MB")
        what, when = _kill_at(cmd, tmp_path, dest.name, delay, True)
        assert set(os.listdir(tmp_path)) - {dest.name} <= set(_temp_files(tmp_path, dest.name))
        if dest.exists():  # complete: the index and every shard it names, the right tensors
            model = n2n.load_model(str(dest))
            assert sorted(model.tensors.keys()) == sorted(expected)
            for k, t in expected.items():
                assert torch.equal(model.tensors.get(k), t), f"{what} after {when:.2f} s: {k} differs"


# ------------------------------------------------------------------------------ overwriting inputs


@pytest.fixture
def cnn(tmp_path):
    src_ckpt, src_arch = example_paths("cnn")
    ckpt, arch = tmp_path / "cnn.safetensors", tmp_path / "cnn.yaml"
    ckpt.write_bytes(open(src_ckpt, "rb").read())
    arch.write_bytes(open(src_arch, "rb").read())
    return ckpt, arch


WRITERS = {
    "widen": lambda ckpt, arch, out: ["widen", str(ckpt), "--arch", str(arch), "--layer", "conv1", "--width", "12", "-o", str(out)],
    "deepen": lambda ckpt, arch, out: ["deepen", str(ckpt), "--arch", str(arch), "--after", "relu1", "-o", str(out)],
    "apply": lambda ckpt, arch, out: ["apply", str(ckpt), example_paths("cnn")[0].replace("cnn.safetensors", "cnn-wider-deeper.yaml"),
                                      "--arch", str(arch), "-o", str(out)],
}


def _refused(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.parametrize("command", list(WRITERS))
@pytest.mark.parametrize("target", ["checkpoint", "same-file-other-spelling", "hard-link", "architecture"])
def test_writing_over_an_input_is_refused(runner, cnn, command, target):
    ckpt, arch = cnn
    out = {"checkpoint": ckpt, "same-file-other-spelling": ckpt.parent / "." / ckpt.name, "architecture": arch}.get(target)
    if target == "hard-link":
        out = ckpt.parent / "link.safetensors"
        os.link(ckpt, out)
    before = {p: sha(p) for p in (ckpt, arch)}
    _refused(runner.invoke(app, WRITERS[command](ckpt, arch, out)), "is the input", "--overwrite-input")
    assert {p: sha(p) for p in (ckpt, arch)} == before
    assert sorted(os.listdir(ckpt.parent)) == sorted(["cnn.safetensors", "cnn.yaml"] + (["link.safetensors"] if target == "hard-link" else []))


@pytest.mark.parametrize("command", list(WRITERS))
def test_overwrite_input_replaces_it_whole(runner, cnn, command):
    ckpt, arch = cnn
    before = sha(ckpt)
    result = runner.invoke(app, WRITERS[command](ckpt, arch, ckpt) + ["--overwrite-input"])
    assert result.exit_code == 0, result.output
    assert sha(ckpt) != before
    assert n2n.load_model(str(ckpt)).history, "the new file carries its history"
    assert sorted(os.listdir(ckpt.parent)) == ["cnn.safetensors", "cnn.yaml"]


@pytest.mark.slow
def test_sigkill_while_overwriting_the_input(big, tmp_path):
    """--overwrite-input killed mid-write: the input path holds the old or the new file, whole."""
    folder = tmp_path
    ckpt = folder / "teacher.safetensors"
    ckpt.write_bytes(big["ckpt"].read_bytes())
    old = sha(ckpt)
    cmd = _widen_cmd(ckpt, big["arch"], ckpt, "--overwrite-input")
    what, when = _kill_at(cmd, folder, ckpt.name, 0.05, True)
    assert sha(ckpt) in (old, big["expected"]), f"{what} after {when:.2f} s: the input path holds a partial file"
    assert set(os.listdir(folder)) - {ckpt.name} <= set(_temp_files(folder, ckpt.name))


@pytest.mark.parametrize("command", list(WRITERS))
def test_missing_output_folder_is_a_clear_error(runner, cnn, command):
    ckpt, arch = cnn
    out = ckpt.parent / "no" / "such" / "out.safetensors"
    _refused(runner.invoke(app, WRITERS[command](ckpt, arch, out)), "does not exist")
    assert not (ckpt.parent / "no").exists()


def test_output_that_is_a_folder_is_a_clear_error(runner, cnn):
    ckpt, arch = cnn
    _refused(runner.invoke(app, WRITERS["widen"](ckpt, arch, ckpt.parent)), "is a folder")
