"""Commands chained through pipes, as real processes: `-` reads stdin, `-o -` writes stdout, and
human output never mixes into the checkpoint bytes."""

from __future__ import annotations

import json
import os
import pty
import shlex
import subprocess

import pytest
from safetensors.torch import load as st_load

from conftest import RECIPES, example_paths, n2n_exe
from n2nsurgery import load_model


def _bash(script: str, **kw) -> subprocess.CompletedProcess:
    """Run `script` under bash with pipefail, as a CI job would."""
    return subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def n2n() -> str:
    return shlex.quote(n2n_exe())


def test_widen_deepen_apply_verify_pipeline_under_pipefail(n2n, tmp_path):
    """The chain of docs/commands.md#pipelines, with apply in the middle and tee keeping a copy of the bytes that flowed."""
    ckpt, arch = example_paths("cnn")
    recipe = tmp_path / "more.yaml"
    recipe.write_text("seed: 2\nsteps:\n  - widen: {layer: conv2, width: 12, split: random}\n  - deepen: {after: relu1}\n")
    copy = tmp_path / "student.safetensors"
    script = (
        f"{n2n} widen {ckpt} --arch {arch} --layer conv1 --width 16 -o - "
        f"| {n2n} deepen - --after relu2 --op conv -o - "
        f"| {n2n} apply - {recipe} -o - "
        f"| tee {copy} "
        f"| {n2n} verify {ckpt} - --arch-a {arch} --json"
    )
    p = _bash(script)
    assert p.returncode == 0, p.stderr.decode()
    doc = json.loads(p.stdout)  # only the last command's JSON reaches stdout
    assert doc["passed"] is True
    assert max(o["max_abs"] for o in doc["outputs"]) <= 1e-5
    err = p.stderr.decode()
    assert "wrote <stdout>" in err and "recipe applied" in err  # human output went to stderr

    # What flowed through the pipe was a checkpoint and nothing else: the safetensors library
    # reads every byte of it, and its lineage holds all four steps.
    raw = copy.read_bytes()
    tensors = st_load(raw)
    assert tuple(tensors["conv1.weight"].shape) == (16, 3, 3, 3)
    assert tuple(tensors["conv2.weight"].shape) == (12, 16, 3, 3)
    history = load_model(str(copy)).history
    assert [(h["op"], h.get("command")) for h in history] == [
        ("widen", None), ("deepen", None), ("widen", "apply"), ("deepen", "apply")
    ]
    assert history[0]["args"]["width"] == 16 and history[2]["args"]["width"] == 12
    assert all(h["verification"]["passed"] for h in history)


def test_empty_stdin_is_exit_2_with_a_clear_message(n2n, tmp_path):
    cmd = ["apply", "-", str(RECIPES / "mlp-wider-deeper.yaml"), "-o", str(tmp_path / "out.safetensors")]
    p = subprocess.run([n2n_exe(), *cmd], stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    assert p.returncode == 2
    err = p.stderr.decode()
    assert "standard input is empty" in err and "Traceback" not in err
    assert p.stdout == b"" and not (tmp_path / "out.safetensors").exists()


def test_truncated_stdin_is_exit_2(n2n):
    data = (RECIPES / "cnn.safetensors").read_bytes()
    cut = data[: len(data) // 2]
    p = subprocess.run([n2n_exe(), "diff", str(RECIPES / "cnn.safetensors"), "-", "--arch", str(RECIPES / "cnn.yaml")],
                       input=cut, capture_output=True, timeout=300)
    assert p.returncode == 2
    err = p.stderr.decode()
    assert err.startswith("error: <stdin>: truncated") and "Traceback" not in err


def test_a_failing_upstream_command_fails_the_pipeline(n2n, tmp_path):
    """widen refuses (width not larger): pipefail reports it, and the reader says its input is empty."""
    ckpt, arch = example_paths("cnn")
    out = tmp_path / "never.safetensors"
    p = _bash(f"{n2n} widen {ckpt} --arch {arch} --layer conv1 --width 4 -o - | {n2n} apply - {RECIPES / 'cnn-wider-deeper.yaml'} -o {out}")
    assert p.returncode == 2
    err = p.stderr.decode()
    assert "not larger than" in err
    assert "standard input is empty" in err
    assert not out.exists()


def test_a_failing_step_downstream_of_a_pipe_writes_nothing(n2n, tmp_path):
    ckpt, arch = example_paths("cnn")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - deepen: {after: relu2}\n  - widen: {layer: fc, width: 20}\n")  # fc is the output
    out = tmp_path / "never.safetensors"
    p = _bash(f"cat {ckpt} | {n2n} apply - {bad} --arch {arch} -o {out}")
    assert p.returncode == 2
    assert "step 2 (widen fc)" in p.stderr.decode()
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml"]  # no output, no temporary file


def test_binary_is_never_written_to_a_terminal(n2n):
    ckpt, arch = example_paths("mlp")
    leader, follower = pty.openpty()
    try:
        p = subprocess.run([n2n_exe(), "apply", ckpt, str(RECIPES / "mlp-wider-deeper.yaml"), "--arch", arch, "-o", "-"],
                           stdout=follower, stderr=subprocess.PIPE, timeout=300)
    finally:
        os.close(follower)
    try:
        os.set_blocking(leader, False)
        try:
            written = os.read(leader, 1 << 16)
        except (BlockingIOError, OSError):
            written = b""
    finally:
        os.close(leader)
    assert p.returncode == 2
    assert "refusing to write a binary checkpoint to a terminal" in p.stderr.decode()
    assert written == b""
