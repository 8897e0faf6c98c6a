"""Every kind of bad input, through the CLI: exit 2, one message naming the file/node/key, no traceback.

Each case builds a bad checkpoint or architecture in a temporary folder from the shipped MLP or
CNN example and runs it through both `n2n inspect` and `n2n verify`.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import example_paths
from n2nsurgery.cli import app
from n2nsurgery.examples import CNN_YAML, MLP_YAML

MLP_CKPT, MLP_ARCH = example_paths("mlp")
CNN_CKPT, CNN_ARCH = example_paths("cnn")


def _write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def _mlp_arch(tmp_path, old: str, new: str, name: str = "bad.yaml") -> tuple[str, str]:
    assert old in MLP_YAML, old  # keep the edit honest if the example changes
    return MLP_CKPT, _write(tmp_path, name, MLP_YAML.replace(old, new))


def _cnn_arch(tmp_path, old: str, new: str) -> tuple[str, str]:
    assert old in CNN_YAML, old
    return CNN_CKPT, _write(tmp_path, "bad.yaml", CNN_YAML.replace(old, new))


def _mlp_ckpt(tmp_path, change) -> tuple[str, str]:
    """The MLP checkpoint with `change(state)` applied, saved by the safetensors library."""
    state = load_file(MLP_CKPT)
    change(state)
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path, metadata={"format": "pt"})
    return path, MLP_ARCH


def _mlp_bytes(tmp_path, edit) -> tuple[str, str]:
    return _write(tmp_path, "bad.safetensors", edit(open(MLP_CKPT, "rb").read())), MLP_ARCH


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


# (id, make(tmp_path) -> (checkpoint, arch), fragments the message must contain)
CASES = [
    ("missing-checkpoint", lambda t: (str(t / "nope.safetensors"), MLP_ARCH), ["nope.safetensors", "no such file"]),
    ("missing-arch", lambda t: (MLP_CKPT, str(t / "nope.yaml")), ["nope.yaml", "no such file"]),
    ("checkpoint-is-folder", lambda t: (_folder(t, "ckdir"), MLP_ARCH), ["ckdir"]),
    ("empty-checkpoint", lambda t: (_write(t, "empty.safetensors", b""), MLP_ARCH), ["empty.safetensors", "not a safetensors file"]),
    ("text-as-checkpoint", lambda t: (MLP_ARCH, MLP_ARCH), ["mlp.yaml", "not a safetensors file"]),
    (
        "header-not-json",
        lambda t: (_write(t, "junk.safetensors", struct.pack("<Q", 16) + b"this is no json!"), MLP_ARCH),
        ["junk.safetensors", "not a safetensors file", "not JSON"],
    ),
    (
        "truncated-in-header",
        lambda t: _mlp_bytes(t, lambda d: d[: 8 + _header_len(d) // 2]),
        ["bad.safetensors", "truncated"],
    ),
    (
        "truncated-in-data",
        lambda t: _mlp_bytes(t, lambda d: d[:-100]),
        ["bad.safetensors", "truncated", "fc"],
    ),
    ("malformed-yaml", lambda t: (MLP_CKPT, _write(t, "bad.yaml", "format: n2n-arch/1\nnodes: [a\n")), ["bad.yaml", "malformed YAML", "line 3"]),
    ("yaml-not-a-mapping", lambda t: (MLP_CKPT, _write(t, "bad.yaml", "- just\n- a list\n")), ["bad.yaml", "mapping"]),
    ("wrong-format", lambda t: _mlp_arch(t, "format: n2n-arch/1", "format: n2n-arch/2"), ["bad.yaml", "format", "n2n-arch/1", "n2n-arch/2"]),
    ("missing-format", lambda t: _mlp_arch(t, "format: n2n-arch/1\n", ""), ["bad.yaml", "format", "n2n-arch/1"]),
    ("unknown-top-key", lambda t: _mlp_arch(t, "name: mlp", "nmae: mlp"), ["bad.yaml", "nmae"]),
    ("unknown-op", lambda t: _mlp_arch(t, "op: relu, in: fc1", "op: rleu, in: fc1"), ["bad.yaml", "relu1", "unknown op", "rleu", "'relu'"]),
    ("missing-input", lambda t: _mlp_arch(t, "{name: relu1, op: relu, in: fc1}", "{name: relu1, op: relu}"), ["bad.yaml", "relu1", "in"]),
    ("dangling-input", lambda t: _mlp_arch(t, "op: relu, in: fc1", "op: relu, in: fc9"), ["bad.yaml", "relu1", "'fc9'"]),
    ("dangling-model-input", lambda t: _mlp_arch(t, "op: linear, in: x}", "op: linear, in: y}"), ["bad.yaml", "fc1", "'y'"]),
    ("cycle", lambda t: _mlp_arch(t, "name: fc1, op: linear, in: x", "name: fc1, op: linear, in: relu2"), ["bad.yaml", "cycle", "fc1"]),
    ("self-loop", lambda t: _mlp_arch(t, "op: relu, in: fc1", "op: relu, in: relu1"), ["bad.yaml", "cycle", "relu1"]),
    ("duplicate-node", lambda t: _mlp_arch(t, "name: relu2", "name: relu1"), ["bad.yaml", "duplicate", "relu1"]),
    ("node-named-like-input", lambda t: _mlp_arch(t, "name: relu1, op: relu, in: fc1", "name: x, op: relu, in: fc1"), ["bad.yaml", "duplicate", "'x'", "input"]),
    ("unknown-output", lambda t: _mlp_arch(t, "outputs: [fc3]", "outputs: [fc4]"), ["bad.yaml", "output", "'fc4'"]),
    (
        "missing-parameter",
        lambda t: _mlp_ckpt(t, lambda s: s.pop("fc2.weight")),
        ["bad.safetensors", "'fc2'", "'fc2.weight'"],
    ),
    (
        "missing-parameter-renamed-node",
        lambda t: _mlp_arch(t, "name: fc3, op: linear, in: relu2}\noutputs: [fc3]", "name: head, op: linear, in: relu2}\noutputs: [head]"),
        ["'head'", "'head.weight'", "fc3.weight"],
    ),
    (
        "missing-batchnorm-statistics",
        lambda t: (_strip_key(t, CNN_CKPT, "bn2.running_var"), CNN_ARCH),
        ["'bn2'", "'bn2.running_var'"],
    ),
    (
        "param-shape-disagrees-with-graph",
        lambda t: _mlp_ckpt(t, lambda s: s.update({"fc2.weight": torch.zeros(32, 31)})),
        ["mlp.yaml", "'fc2'", "[32, 31]", "31 input features", "has 32"],
    ),
    (
        "bias-shape",
        lambda t: _mlp_ckpt(t, lambda s: s.update({"fc1.bias": torch.zeros(31)})),
        ["mlp.yaml", "'fc1'", "bias", "[31]"],
    ),
    (
        "batchnorm-shape",
        lambda t: (_replace_key(t, CNN_CKPT, "bn1.running_mean", torch.zeros(7)), CNN_ARCH),
        ["cnn.yaml", "'bn1'", "running_mean", "[7]"],
    ),
    (
        "flatten-into-wrong-linear",
        lambda t: _cnn_arch(t, "{name: pool1, op: max_pool2d, in: relu1, kernel_size: 2}", "{name: pool1, op: max_pool2d, in: relu1, kernel_size: 1}"),
        ["bad.yaml", "'fc'", "96", "384"],
    ),
    ("integer-weight", lambda t: _mlp_ckpt(t, lambda s: s.update({"fc1.weight": torch.zeros(32, 16, dtype=torch.int64)})), ["'fc1'", "'fc1.weight'", "int64"]),
    ("unknown-attribute", lambda t: _mlp_arch(t, "op: relu, in: fc1", "op: relu, in: fc1, slope: 2"), ["bad.yaml", "relu1", "unknown attribute", "'slope'"]),
    ("unknown-attribute-typo", lambda t: _cnn_arch(t, "kernel_size: 2", "kernel_size: 2, strid: 2"), ["bad.yaml", "pool1", "'strid'", "'stride'"]),
    ("attribute-wrong-type", lambda t: _cnn_arch(t, "kernel_size: 2", "kernel_size: two"), ["bad.yaml", "pool1", "kernel_size", "'two'"]),
    ("attribute-bool-for-int", lambda t: _cnn_arch(t, "padding: 1}", "padding: yes}"), ["bad.yaml", "conv1", "padding", "True"]),
    ("attribute-bad-choice", lambda t: _cnn_arch(t, "padding: 1}", "padding: full}"), ["bad.yaml", "conv1", "padding", "'full'"]),
    ("attribute-missing-required", lambda t: _cnn_arch(t, ", kernel_size: 2", ""), ["bad.yaml", "pool1", "kernel_size"]),
    ("wrong-arity", lambda t: _mlp_arch(t, "op: relu, in: fc1", "op: relu, in: [fc1, x]"), ["bad.yaml", "relu1", "1 input"]),
    ("add-one-input", lambda t: _mlp_arch(t, "op: relu, in: fc1", "op: add, in: [fc1]"), ["bad.yaml", "relu1", "two or more"]),
    ("unknown-param-role", lambda t: _mlp_arch(t, "op: linear, in: x}", "op: linear, in: x, params: {wieght: fc1.weight}}"), ["bad.yaml", "fc1", "'wieght'"]),
    ("bad-input-shape", lambda t: _mlp_arch(t, "shape: [16]", "shape: [16, 0]"), ["bad.yaml", "'x'", "shape"]),
    ("integer-input-without-high", lambda t: _mlp_arch(t, "dtype: float32", "dtype: int64"), ["bad.yaml", "'x'", "high"]),
    (
        "bad-embedded-arch",
        lambda t: (_with_metadata(t, {"format": "pt", "n2n.arch": "format: n2n-arch/1\nnodes: [\n"}), None),
        ["bad.safetensors", "n2n.arch", "malformed YAML"],
    ),
    (
        "bad-history",
        lambda t: (_with_metadata(t, {"format": "pt", "n2n.arch": MLP_YAML, "n2n.history": "{nope"}), None),
        ["bad.safetensors", "n2n.history"],
    ),
    ("duplicate-key-in-node", lambda t: _mlp_arch(t, "op: relu, in: fc1}", "op: relu, in: fc1, in: x}"), ["bad.yaml", "line 7", "'in'", "twice"]),
    ("duplicate-input-name", lambda t: _mlp_arch(t, "  x: {shape: [16], dtype: float32}\n", "  x: {shape: [16], dtype: float32}\n  x: {shape: [8], dtype: float32}\n"), ["bad.yaml", "'x'", "twice"]),
    ("duplicate-top-key", lambda t: _mlp_arch(t, "outputs: [fc3]", "outputs: [fc3]\noutputs: [fc2]"), ["bad.yaml", "'outputs'", "twice"]),
    ("integer-input-high-too-big", lambda t: _mlp_arch(t, "dtype: float32}", "dtype: uint8, high: 1000}"), ["bad.yaml", "'x'", "high 1000", "uint8"]),
    ("no-arch-anywhere", lambda t: (MLP_CKPT, None), ["mlp.safetensors", "--arch"]),
]


def _folder(tmp_path, name: str) -> str:
    (tmp_path / name).mkdir()
    (tmp_path / name / "notes.txt").write_text("not a checkpoint")
    return str(tmp_path / name)


def _strip_key(tmp_path, src: str, key: str) -> str:
    state = load_file(src)
    del state[key]
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    return path


def _replace_key(tmp_path, src: str, key: str, value) -> str:
    state = load_file(src)
    state[key] = value
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    return path


def _with_metadata(tmp_path, metadata: dict) -> str:
    path = str(tmp_path / "bad.safetensors")
    save_file(load_file(MLP_CKPT), path, metadata=metadata)
    return path


def _argv(command: str, ckpt: str, arch) -> list:
    if command == "inspect":
        return ["inspect", ckpt] + (["--arch", arch] if arch else [])
    # verify: the bad model as A against itself; the error must come before anything runs
    return ["verify", ckpt, ckpt, "--device", "cpu"] + (["--arch", arch] if arch else [])


def assert_bad_input(result, fragments) -> str:
    """Exit 2, one `error:` line on stderr containing every fragment, nothing on stdout, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("command", ["inspect", "verify"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_the_culprit(runner, tmp_path, case, command):
    _, make, fragments = case
    ckpt, arch = make(tmp_path)
    assert_bad_input(runner.invoke(app, _argv(command, ckpt, arch)), fragments)


def test_bad_b_in_verify_names_b(runner, tmp_path):
    bad = _write(tmp_path, "b.safetensors", b"\x00" * 3)
    result = runner.invoke(app, ["verify", MLP_CKPT, bad, "--arch", MLP_ARCH, "--device", "cpu"])
    assert_bad_input(result, ["b.safetensors", "not a safetensors file"])


def test_bad_arch_b_in_verify_names_it(runner, tmp_path):
    bad = _write(tmp_path, "b.yaml", MLP_YAML.replace("op: relu, in: fc1", "op: relu, in: nowhere"))
    result = runner.invoke(app, ["verify", MLP_CKPT, MLP_CKPT, "--arch-a", MLP_ARCH, "--arch-b", bad, "--device", "cpu"])
    assert_bad_input(result, ["b.yaml", "relu1", "'nowhere'"])


@pytest.mark.parametrize("which", ["checkpoint", "arch"])
def test_unreadable_file(runner, tmp_path, which):
    src = MLP_CKPT if which == "checkpoint" else MLP_ARCH
    locked = tmp_path / os.path.basename(src)
    locked.write_bytes(open(src, "rb").read())
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("this user (root) reads files whatever their mode; see test_unreadable_file_even_as_root")
        ckpt, arch = (str(locked), MLP_ARCH) if which == "checkpoint" else (MLP_CKPT, str(locked))
        assert_bad_input(runner.invoke(app, ["inspect", ckpt, "--arch", arch]), [str(locked), "cannot read", "ermission"])
    finally:
        locked.chmod(0o600)


@pytest.mark.parametrize("which", ["checkpoint", "architecture"])
def test_unreadable_file_even_as_root(runner, monkeypatch, which):
    """The same path as chmod 000, for machines where the tests run as root."""
    import n2nsurgery.inputs as mod

    target = MLP_CKPT if which == "checkpoint" else MLP_ARCH
    real_open = open

    def guarded_open(path, *args, **kwargs):
        if str(path) == target:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(mod, "open", guarded_open, raising=False)
    result = runner.invoke(app, ["inspect", MLP_CKPT, "--arch", MLP_ARCH])
    assert_bad_input(result, [target, "cannot read (Permission denied)"])


def test_empty_stdin(runner):
    result = runner.invoke(app, ["inspect", "-", "--arch", MLP_ARCH], input=b"")
    assert_bad_input(result, ["standard input is empty"])


def test_garbage_on_stdin(runner):
    result = runner.invoke(app, ["inspect", "-", "--arch", MLP_ARCH], input=b"hello, this is not a checkpoint")
    assert_bad_input(result, ["<stdin>", "not a safetensors file"])


def test_both_verify_arguments_on_stdin(runner):
    result = runner.invoke(app, ["verify", "-", "-", "--arch", MLP_ARCH], input=open(MLP_CKPT, "rb").read())
    assert_bad_input(result, ["only one of A and B"])


def test_errors_name_the_key_as_written_in_params(runner, tmp_path):
    # A node that maps a role to another key: the message names that key, not "<node>.weight".
    arch = _write(tmp_path, "bad.yaml", MLP_YAML.replace("op: linear, in: relu2}", "op: linear, in: relu2, params: {weight: head.w}}"))
    result = runner.invoke(app, ["inspect", MLP_CKPT, "--arch", arch])
    assert_bad_input(result, ["'fc3'", "'head.w'"])


# ---------------------------------------------------------------------------------- --debug


def test_debug_shows_a_traceback(runner, tmp_path):
    bad = _write(tmp_path, "bad.yaml", "format: n2n-arch/1\nnodes: [a\n")
    result = runner.invoke(app, ["--debug", "inspect", MLP_CKPT, "--arch", bad])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "error: " in result.stderr and "malformed YAML" in result.stderr


def test_debug_does_not_stick_to_the_next_run(runner, tmp_path):
    bad = _write(tmp_path, "bad.yaml", "format: n2n-arch/1\nnodes: [a\n")
    runner.invoke(app, ["--debug", "inspect", MLP_CKPT, "--arch", bad])
    result = runner.invoke(app, ["inspect", MLP_CKPT, "--arch", bad])
    assert_bad_input(result, ["malformed YAML"])


def test_n2n_debug_environment_variable(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("N2N_DEBUG", "1")
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.safetensors"), "--arch", MLP_ARCH])
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_usage_error_exits_2(runner):
    result = runner.invoke(app, ["verify", MLP_CKPT])  # B is missing
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_error_json_stays_off_stdout(runner, tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.safetensors"), "--arch", MLP_ARCH, "--json"])
    assert_bad_input(result, ["no such file"])


def test_header_data_offsets_overlap(runner, tmp_path):
    data = open(MLP_CKPT, "rb").read()
    n = _header_len(data)
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [header[key]["data_offsets"][0] + 4, header[key]["data_offsets"][1] + 4]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad = _write(tmp_path, "bad.safetensors", struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    assert_bad_input(runner.invoke(app, ["inspect", bad, "--arch", MLP_ARCH]), ["bad.safetensors", repr(key)])


def test_missing_architecture_points_at_the_yaml_beside_the_checkpoint(runner, tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(open(MLP_CKPT, "rb").read())
    assert_bad_input(runner.invoke(app, ["inspect", str(ckpt)]), ["carries no architecture", "pass --arch FILE"])
    assert "beside" not in runner.invoke(app, ["inspect", str(ckpt)]).stderr  # nothing there yet
    (tmp_path / "model.yaml").write_text(open(MLP_ARCH).read())
    result = runner.invoke(app, ["inspect", str(ckpt)])
    assert_bad_input(result, [f"({tmp_path / 'model.yaml'} lies beside it)"])
