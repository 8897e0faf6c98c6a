"""Fuzzed inputs: whatever a user feeds the tool, the answer is exit 2 and one message.

Families: mutated safetensors headers (lengths, offsets, dtypes, shapes, metadata), random bytes,
truncated files, architecture YAML with wrong types, negative or zero sizes, huge sizes (refused
before anything is allocated), NaN/Inf in tensors (refused unless ``--allow-nonfinite``), and
names that are not UTF-8. For each: never a traceback, an exit code other than 0 or 2, a hang,
or a partial output file. Most cases run in-process (``CliRunner``, the Python API) for speed;
a few run the real console script, where argv and file names are raw bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import n2nsurgery as n2n  # noqa: E402
from conftest import example_paths, n2n_exe  # noqa: E402
from n2nsurgery.checkpoint import open_checkpoint  # noqa: E402
from n2nsurgery.cli import app  # noqa: E402
from n2nsurgery.errors import N2NError  # noqa: E402

MLP_CKPT, MLP_ARCH = example_paths("mlp")
CNN_CKPT, CNN_ARCH = example_paths("cnn")

from acceptance import Tally  # noqa: E402
from hypothesis_profiles import LONG  # noqa: E402  (registers and loads "ci" / "long")

# Minimum shares of fuzzed inputs that load (tests/acceptance.py): a refusal passes these tests,
# so a loader that refused everything would pass them without a floor. A little under the rates
# measured with the ci profile (headers 1/150, headers through the CLI 1/25, YAML 6/200: the
# generators mutate nearly every input into an invalid one, so these floors only prove that the
# loaders do not refuse everything).
FLOORS = {"fuzz headers": 0.005, "fuzz headers cli": 0.03, "fuzz yaml": 0.02}


# ------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""

    def _raise(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s: a hang?")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def invoke(runner, args, **kw):
    with no_hang():
        return runner.invoke(app, [str(a) for a in args], **kw)


def assert_ok_or_refused(result, args) -> None:
    """Exit 0, or exit 2 with one `error:` line (or Click's usage message); never a traceback."""
    assert result.exit_code in (0, 2), f"{args}: exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    assert "internal error" not in result.output, result.output
    if result.exit_code == 2:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert lines, f"{args}: exit 2 without a message"
        assert lines[-1].startswith("error: ") or "Usage" in result.stderr, result.stderr


def assert_refused(result, *fragments) -> str:
    """Exit 2 with exactly one `error:` line containing every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def assert_usage_error(result) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert "Invalid value" in result.stderr or "Usage" in result.stderr or result.stderr.startswith("error: "), result.stderr


def assert_nothing_written(folder, before: set) -> None:
    """No output, no temporary file: the folder holds exactly what it held before."""
    assert set(os.listdir(folder)) == before, f"left behind: {set(os.listdir(folder)) - before}"


def split_file(raw: bytes) -> tuple:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def pack(header, data: bytes, length=None) -> bytes:
    """A safetensors file from a header (object, or raw JSON bytes) and data; `length` overrides
    the header length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def api_outcome(ckpt: str, arch: str | None):
    """Load through the API: a Model, or the N2NError; anything else propagates (a bug)."""
    try:
        return n2n.load_model(ckpt, arch)
    except N2NError as e:
        assert str(e).strip() and "\n" not in str(e), repr(str(e))
        return e


MLP_BYTES = open(MLP_CKPT, "rb").read()
MLP_HEADER, MLP_DATA = split_file(MLP_BYTES)

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-4, 2**65), st.text(max_size=2), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 5), max_size=2),
)
DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F128", "f32", "", "C64"]


# ------------------------------------------------------------------------ safetensors headers


@st.composite
def mutated_checkpoints(draw) -> bytes:
    header = json.loads(json.dumps(MLP_HEADER))
    data = MLP_DATA
    length = None
    keys = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["dtype", "shape", "offsets", "field", "drop", "rename", "metadata", "length", "data", "whole"]))
        key = draw(st.sampled_from(keys))
        entry = header.get(key)
        if not isinstance(entry, dict):
            continue
        if what == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(DTYPE_CODES), JUNK))
        elif what == "shape":
            shape = list(entry.get("shape", [])) if isinstance(entry.get("shape"), list) else []
            choice = draw(st.sampled_from(["junk", "dim", "append", "pop", "huge"]))
            if choice == "junk":
                entry["shape"] = draw(JUNK)
            elif choice == "dim" and shape:
                shape[draw(st.integers(0, len(shape) - 1))] = draw(JUNK)
                entry["shape"] = shape
            elif choice == "append":
                entry["shape"] = shape + [draw(st.sampled_from([0, 1, 2, 2**40, 2**64, -1]))]
            elif choice == "pop" and shape:
                entry["shape"] = shape[:-1]
            else:
                entry["shape"] = [2**62, 2**62, 0] if draw(st.booleans()) else [10**30]
        elif what == "offsets":
            offs = entry.get("data_offsets")
            if isinstance(offs, list) and len(offs) == 2 and draw(st.booleans()):
                d = draw(st.integers(-64, 64))
                entry["data_offsets"] = [offs[0] + d, offs[1] + draw(st.sampled_from([0, d, -d, 2**64]))]
            else:
                entry["data_offsets"] = draw(JUNK)
        elif what == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", ""]))] = draw(JUNK)
        elif what == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif what == "rename":
            header[draw(st.text(max_size=8))] = header.pop(key)
            keys = [k for k in header if k != "__metadata__"]
        elif what == "metadata":
            header["__metadata__"] = draw(st.one_of(JUNK, st.dictionaries(st.text(max_size=4), JUNK, max_size=3)))
        elif what == "length":
            length = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 7, 8, 2**64 - 1, 100 * 2**20 + 1])))
        elif what == "data":
            cut = draw(st.integers(0, len(data)))
            data = data[:cut] + draw(st.binary(max_size=16)) if draw(st.booleans()) else data[:cut]
        else:
            header[key] = draw(JUNK)
    return pack(header, data, length)


def test_mutated_headers_load_or_exit_2(tmp_path_factory):
    tally = Tally("fuzz headers", FLOORS["fuzz headers"])
    _mutated_headers(tmp_path_factory=tmp_path_factory, tally=tally)
    tally.check()


@settings(max_examples=2000 if LONG else 150)
@given(raw=mutated_checkpoints())
def _mutated_headers(raw, tmp_path_factory, tally):
    folder = tmp_path_factory.mktemp("hdr")
    path = folder / "m.safetensors"
    path.write_bytes(raw)
    outcome = api_outcome(str(path), MLP_ARCH)
    tally.refuse() if isinstance(outcome, N2NError) else tally.accept()
    if isinstance(outcome, N2NError):
        assert str(path) in str(outcome) or MLP_ARCH in str(outcome), f"the message names no file: {outcome}"


def test_mutated_headers_through_the_cli(tmp_path_factory):
    """inspect, then (when it loads) a widen: exit 0 or 2, and a refused widen writes nothing."""
    tally = Tally("fuzz headers cli", FLOORS["fuzz headers cli"])
    _mutated_headers_cli(tmp_path_factory=tmp_path_factory, tally=tally)
    tally.check()


@settings(max_examples=300 if LONG else 25)
@given(raw=mutated_checkpoints())
def _mutated_headers_cli(raw, tmp_path_factory, tally):
    from typer.testing import CliRunner

    runner = CliRunner()
    folder = tmp_path_factory.mktemp("hdrcli")
    path = folder / "m.safetensors"
    path.write_bytes(raw)
    args = ["inspect", path, "--arch", MLP_ARCH]
    result = invoke(runner, args)
    assert_ok_or_refused(result, args)
    tally.accept() if result.exit_code == 0 else tally.refuse()
    if result.exit_code == 0:
        before = set(os.listdir(folder))
        out = folder / "out.safetensors"
        args = ["widen", path, "--arch", MLP_ARCH, "--layer", "fc1", "--width", "40", "-o", out, "--probes", "4"]
        result = invoke(runner, args)
        assert_ok_or_refused(result, args)
        if result.exit_code == 2:
            assert_nothing_written(folder, before)


@settings(max_examples=1000 if LONG else 60)
@given(raw=st.one_of(st.binary(max_size=600), st.binary(min_size=1, max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b)))
def test_random_bytes_are_refused(raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("rnd") / "r.safetensors"
    path.write_bytes(raw)
    outcome = api_outcome(str(path), MLP_ARCH)
    assert isinstance(outcome, N2NError), "random bytes were accepted as a checkpoint"


def test_every_truncation_is_refused(tmp_path):
    """A checkpoint cut anywhere (inside the length, the header, or the data) is refused, never
    read as a shorter model: every byte count is accounted for by the header."""
    n = len(MLP_BYTES)
    header_end = 8 + struct.unpack("<Q", MLP_BYTES[:8])[0]
    cuts = sorted(set(range(0, header_end + 64)) | set(range(header_end + 64, n, 97)) | {n - 1})
    path = tmp_path / "cut.safetensors"
    for cut in cuts:
        path.write_bytes(MLP_BYTES[:cut])
        with pytest.raises(N2NError, match="cut.safetensors"):
            open_checkpoint(str(path))


@pytest.mark.parametrize("cut", [0, 5, 8, 100, len(MLP_BYTES) // 2, len(MLP_BYTES) - 1])
def test_truncated_checkpoint_on_stdin(runner, cut):
    result = invoke(runner, ["inspect", "-", "--arch", MLP_ARCH], input=MLP_BYTES[:cut])
    assert_refused(result, "empty" if cut == 0 else "<stdin>")


def test_header_length_beyond_the_file(runner, tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(pack(MLP_HEADER, MLP_DATA, length=2**64 - 1))
    assert_refused(invoke(runner, ["inspect", path, "--arch", MLP_ARCH]), "long.safetensors", "implausible")


# ----------------------------------------------------------------------------- YAML, wrong types

CNN_DOC = yaml.safe_load(open(CNN_ARCH).read())


def _paths(doc, prefix=()):
    """Every path (tuple of keys/indices) into the YAML document."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


CNN_PATHS = [p for p in _paths(CNN_DOC) if p]


@st.composite
def mutated_arch_docs(draw) -> str:
    doc = json.loads(json.dumps(CNN_DOC))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(CNN_PATHS))
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = draw(JUNK)
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.sampled_from(["stride", "groups", "padding", "eps", "dim", "extra", "params", "in", "high", "dtype"]))] = draw(JUNK)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or retyped this path
    return yaml.safe_dump(doc, sort_keys=False)


def test_yaml_with_wrong_types_loads_or_exit_2(tmp_path_factory):
    tally = Tally("fuzz yaml", FLOORS["fuzz yaml"])
    _yaml_with_wrong_types(tmp_path_factory=tmp_path_factory, tally=tally)
    tally.check()


@settings(max_examples=2000 if LONG else 200)
@given(text=mutated_arch_docs())
def _yaml_with_wrong_types(text, tmp_path_factory, tally):
    path = tmp_path_factory.mktemp("yml") / "a.yaml"
    path.write_text(text)
    outcome = api_outcome(CNN_CKPT, str(path))
    tally.refuse() if isinstance(outcome, N2NError) else tally.accept()
    if isinstance(outcome, N2NError):
        assert str(path) in str(outcome) or CNN_CKPT in str(outcome), f"the message names no file: {outcome}"
    else:  # it loaded: then it must also run (shapes were checked, so no runtime surprise)
        n2n.verify(outcome, outcome, probes=2, device="cpu")


@settings(max_examples=300 if LONG else 60)
@given(text=st.one_of(st.text(max_size=200), st.from_regex(r"[\[\]{}:,\- a-z0-9\n]{0,80}", fullmatch=True)))
def test_random_yaml_text_is_refused(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("ytxt") / "a.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    assert isinstance(api_outcome(CNN_CKPT, str(path)), N2NError)


def test_yaml_alias_bomb_is_refused_quickly(runner, tmp_path):
    """'Billion laughs': nested aliases must not be expanded into memory."""
    lines = ["format: n2n-arch/1", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines += ["inputs: {x: {shape: [3, 8, 6], dtype: float32}}", "nodes: [{name: c, op: concat, in: *a8}]", "outputs: [c]"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert_refused(invoke(runner, ["inspect", CNN_CKPT, "--arch", path]), "bomb.yaml")


@pytest.mark.parametrize(
    "old,new,fragment",
    [
        ("shape: [3, 8, 6]", "shape: [3, 0, 6]", "positive integers"),
        ("shape: [3, 8, 6]", "shape: [3, -8, 6]", "positive integers"),
        ("shape: [3, 8, 6]", "shape: '3, 8, 6'", "positive integers"),
        ("kernel_size: 2", "kernel_size: 0", "kernel_size"),
        ("kernel_size: 2", "kernel_size: -2", "kernel_size"),
        ("kernel_size: 2", "kernel_size: two", "kernel_size"),
        ("padding: 1}", "padding: -1}", "padding"),
        ("padding: 1}", "padding: 1.5}", "padding"),
        ("padding: 1}", "padding: 1, stride: 0}", "stride"),
        ("padding: 1}", "padding: 1, groups: 0}", "groups"),
        ("padding: 1}", "padding: 1, dilation: [1, 0]}", "dilation"),
        ("op: batchnorm, in: conv1}", "op: batchnorm, in: conv1, eps: 0}", "eps"),
        ("op: batchnorm, in: conv1}", "op: batchnorm, in: conv1, eps: '1e-5'}", "eps"),
        ("op: flatten, in: relu2}", "op: flatten, in: relu2, start_dim: 0}", "start_dim"),
        ("op: flatten, in: relu2}", "op: flatten, in: relu2, start_dim: yes}", "start_dim"),
        ("op: relu, in: bn1}", "op: relu, in: 7}", "in must be"),
        ("op: relu, in: bn1}", "op: relu, in: [bn1, bn1]}", "takes 1 input"),
        ("outputs: [fc]", "outputs: 5", "outputs must be"),
        ("outputs: [fc]", "outputs: []", "outputs must be"),
        ("format: n2n-arch/1", "format: 1", "format must be"),
        ("name: cnn", "name: [cnn]", "name must be a string"),
        ("dtype: float32", "dtype: float31", "dtype must be"),
        ("dtype: float32", "dtype: int64", "needs high"),
    ],
)
def test_yaml_wrong_types_and_sizes(runner, tmp_path, old, new, fragment):
    text = open(CNN_ARCH).read()
    assert old in text
    path = tmp_path / "a.yaml"
    path.write_text(text.replace(old, new, 1))
    assert_refused(invoke(runner, ["inspect", CNN_CKPT, "--arch", path]), "a.yaml", fragment)


# ---------------------------------------------------------------------- negative, zero and huge sizes


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["widen", "--layer", "conv1", "--width", "0"], "not larger"),
        (["widen", "--layer", "conv1", "--width", "-5"], "not larger"),
        (["widen", "--layer", "conv1", "--width", "8"], "not larger"),
        (["deepen", "--after", "relu1", "--op", "residual", "--hidden", "0"], "--hidden"),
        (["deepen", "--after", "relu1", "--op", "residual", "--hidden", "-3"], "--hidden"),
        (["deepen", "--after", "relu1", "--kernel-size", "0"], "--kernel-size"),
        (["deepen", "--after", "relu1", "--kernel-size", "-1"], "--kernel-size"),
        (["deepen", "--after", "relu1", "--kernel-size", "4"], "--kernel-size"),
    ],
)
def test_negative_and_zero_sizes(runner, tmp_path, args, fragment):
    out = tmp_path / "out.safetensors"
    result = invoke(runner, [args[0], CNN_CKPT, "--arch", CNN_ARCH, *args[1:], "-o", out])
    assert_refused(result, fragment)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "args",
    [
        ["verify", CNN_CKPT, CNN_CKPT, "--arch", CNN_ARCH, "--probes", "0"],
        ["verify", CNN_CKPT, CNN_CKPT, "--arch", CNN_ARCH, "--probes", "-1"],
        ["widen", CNN_CKPT, "--arch", CNN_ARCH, "--layer", "conv1", "--width", "9", "--noise", "-1", "-o", "x.safetensors"],
        ["widen", CNN_CKPT, "--arch", CNN_ARCH, "--layer", "conv1", "--width", "nine", "-o", "x.safetensors"],
        ["widen", CNN_CKPT, "--arch", CNN_ARCH, "--layer", "conv1", "--width", "9", "--max-shard-size", "0", "-o", "x"],
        ["widen", CNN_CKPT, "--arch", CNN_ARCH, "--layer", "conv1", "--width", "9", "--max-shard-size", "-1MB", "-o", "x"],
        ["verify", CNN_CKPT, CNN_CKPT, "--arch", CNN_ARCH, "--atol", "-1"],
    ],
)
def test_usage_errors_for_bad_numbers(runner, args):
    assert_usage_error(invoke(runner, args))


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["widen", "--layer", "conv1", "--width", str(10**12)], "would need about"),
        (["widen", "--layer", "conv1", "--width", str(2**63)], "would need about"),
        (["widen", "--layer", "fc", "--width", str(10**40)], "would need about"),
        (["widen", "--layer", "conv2", "--width", str(10**9)], "would need about"),
        (["deepen", "--after", "relu1", "--op", "residual", "--hidden", str(10**12)], "would need about"),
        (["deepen", "--after", "relu1", "--kernel-size", str(10**6 + 1)], "would need about"),
    ],
)
def test_huge_sizes_are_refused_before_allocating(runner, tmp_path, args, fragment):
    out = tmp_path / "out.safetensors"
    result = invoke(runner, [args[0], CNN_CKPT, "--arch", CNN_ARCH, *args[1:], "-o", out])
    line = assert_refused(result, fragment)
    assert "available" in line or "any machine" in line
    assert os.listdir(tmp_path) == []


def test_huge_probe_count_is_refused(runner):
    result = invoke(runner, ["verify", CNN_CKPT, CNN_CKPT, "--arch", CNN_ARCH, "--probes", str(10**12)])
    assert_refused(result, "--probes")


@pytest.mark.parametrize(
    "yaml_text",
    [
        "inputs: {x: {shape: [1000000000000], dtype: float32}}\nnodes: [{name: r, op: relu, in: x}]\noutputs: [r]",
        "inputs: {x: {shape: [100000000000000000000000], dtype: float32}}\nnodes: [{name: r, op: relu, in: x}]\noutputs: [r]",
        "inputs: {x: {shape: [2, 3], dtype: float32}}\nnodes: [{name: p, op: adaptive_avg_pool1d, in: x, output_size: 1000000000000}]\noutputs: [p]",
    ],
)
def test_huge_shapes_in_yaml_are_refused_before_running(runner, tmp_path, yaml_text):
    arch = tmp_path / "huge.yaml"
    arch.write_text("format: n2n-arch/1\n" + yaml_text + "\n")
    ckpt = tmp_path / "empty.safetensors"
    save_file({"unused": torch.zeros(1)}, str(ckpt))
    assert invoke(runner, ["inspect", ckpt, "--arch", arch]).exit_code == 0  # only shapes: fine
    assert_refused(invoke(runner, ["verify", ckpt, ckpt, "--arch", arch]), "would need about")


# -------------------------------------------------------------------------------------- NaN / Inf


def _poisoned(tmp_path, value: float, key: str = "fc1.weight") -> str:
    sd = load_file(MLP_CKPT)
    sd[key].view(-1)[3] = value
    path = tmp_path / "poisoned.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    return str(path)


SURGERY = {
    "widen": ["widen", "{ckpt}", "--arch", MLP_ARCH, "--layer", "fc1", "--width", "40", "-o", "{out}"],
    "deepen": ["deepen", "{ckpt}", "--arch", MLP_ARCH, "--after", "relu1", "-o", "{out}"],
    "apply": ["apply", "{ckpt}", str(example_paths("mlp")[0]).replace(".safetensors", "-wider-deeper.yaml"), "--arch", MLP_ARCH, "-o", "{out}"],
    "verify": ["verify", "{ckpt}", "{ckpt}", "--arch", MLP_ARCH],
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("command", list(SURGERY))
def test_nonfinite_tensors_are_refused_unless_allowed(runner, tmp_path, value, command):
    ckpt = _poisoned(tmp_path, value)
    out = tmp_path / "out.safetensors"
    args = [a.format(ckpt=ckpt, out=out) for a in SURGERY[command]]
    before = set(os.listdir(tmp_path))
    assert_refused(invoke(runner, args), "poisoned.safetensors", "'fc1.weight'", "NaN or Inf", "--allow-nonfinite")
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("command", ["widen", "deepen"])
def test_allow_nonfinite_goes_ahead_unverified(runner, tmp_path, command):
    # NaN in the output layer's bias: the same output entry is NaN in teacher and student.
    ckpt = _poisoned(tmp_path, float("nan"), key="fc3.bias")
    out = tmp_path / "out.safetensors"
    args = [a.format(ckpt=ckpt, out=out) for a in SURGERY[command]] + ["--allow-nonfinite"]
    # A NaN output cannot vouch for the student: verifying is refused (exit 2), not "pass".
    assert_refused(invoke(runner, args), "the teacher's output 'fc3' is NaN/Inf on the probes", "--no-verify")
    assert not out.exists()
    result = invoke(runner, args + ["--no-verify"])
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_allow_nonfinite_verify_never_says_equal(runner, tmp_path):
    ckpt = _poisoned(tmp_path, float("nan"), key="fc3.bias")
    args = [a.format(ckpt=ckpt) for a in SURGERY["verify"]] + ["--allow-nonfinite"]
    result = invoke(runner, args)
    assert result.exit_code == 1, result.output
    assert "output 'fc3' is not finite on the probes" in result.stderr


# ---------------------------------------------------------------------------- names that are not UTF-8


def _with_key(tmp_path, name_json: str, metadata=None) -> str:
    """The MLP checkpoint plus an empty tensor whose name is raw JSON (e.g. a lone surrogate escape)."""
    header = json.loads(json.dumps(MLP_HEADER))
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    raw = json.dumps(header)[:-1] + f', {name_json}: {{"dtype": "F32", "shape": [0], "data_offsets": [{end}, {end}]}}}}'
    if metadata is not None:
        raw = raw.replace('"__metadata__": {', '"__metadata__": {' + metadata + ", ", 1)
    path = tmp_path / "names.safetensors"
    path.write_bytes(pack(raw.encode("utf-8", "surrogatepass"), MLP_DATA))
    return str(path)


@pytest.mark.parametrize(
    "name_json,metadata,fragment",
    [
        ('"\\udc80"', None, "not valid Unicode"),
        ('"fc\\ud800.weight"', None, "not valid Unicode"),
        ('"ok"', '"n2n.note": "\\udfff"', "not valid Unicode"),
        ('"\xff\xfe"', None, "not JSON"),  # raw bytes that are not UTF-8 at all
    ],
)
def test_names_that_are_not_utf8_in_checkpoints(runner, tmp_path, name_json, metadata, fragment):
    if name_json == '"\xff\xfe"':
        path = tmp_path / "names.safetensors"
        raw = json.dumps(MLP_HEADER).encode()[:-1] + b', "\xff\xfe": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
        path.write_bytes(pack(raw, MLP_DATA))
        ckpt = str(path)
    else:
        ckpt = _with_key(tmp_path, name_json, metadata)
    before = set(os.listdir(tmp_path))
    out = tmp_path / "out.safetensors"
    assert_refused(invoke(runner, ["deepen", ckpt, "--arch", MLP_ARCH, "--after", "relu1", "-o", out]), fragment)
    assert_nothing_written(tmp_path, before)


def test_architecture_that_is_not_utf8(runner, tmp_path):
    arch = tmp_path / "latin1.yaml"
    arch.write_bytes(open(MLP_ARCH, "rb").read().replace(b"name: mlp", b"name: ml\xe9"))
    assert_refused(invoke(runner, ["inspect", MLP_CKPT, "--arch", arch]), "latin1.yaml", "not UTF-8")


def test_node_name_with_a_surrogate_escape(runner, tmp_path):
    """YAML can spell a lone surrogate ("\\udc80"); such a name could never be written back."""
    arch = tmp_path / "s.yaml"
    arch.write_text(open(MLP_ARCH).read().replace("{name: relu1,", '{name: "r\\udc80",').replace("in: relu1}", 'in: "r\\udc80"}'))
    out = tmp_path / "out.safetensors"
    result = invoke(runner, ["deepen", MLP_CKPT, "--arch", arch, "--after", "fc1", "-o", out])
    assert_ok_or_refused(result, "deepen")
    if result.exit_code == 0:
        assert n2n.load_model(str(out)).arch.has_node("r\udc80")
    else:
        assert not out.exists()


def test_raw_bytes_in_argv_and_paths(tmp_path):
    """A real process: argv and file names are bytes; undecodable ones arrive as surrogate escapes."""
    exe = n2n_exe()
    ckpt, arch = os.fsencode(MLP_CKPT), os.fsencode(MLP_ARCH)
    out = os.path.join(os.fsencode(str(tmp_path)), b"stud\xff\xfe.safetensors")
    bad_layer = subprocess.run([exe, "widen", ckpt, "--arch", arch, "--layer", b"fc\xff", "--width", b"40", "-o", out],
                               capture_output=True, timeout=120)
    assert bad_layer.returncode == 2, bad_layer.stderr
    assert bad_layer.stderr.startswith(b"error: no node named") and b"Traceback" not in bad_layer.stderr
    assert not os.path.exists(out)
    missing = subprocess.run([exe, "inspect", ckpt, "--arch", b"/nonexistent/\xff.yaml"], capture_output=True, timeout=120)
    assert missing.returncode == 2 and b"no such file" in missing.stderr and b"Traceback" not in missing.stderr
    ok = subprocess.run([exe, "widen", ckpt, "--arch", arch, "--layer", b"fc1", "--width", b"40", "-o", out, "--json"],
                        capture_output=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["new_width"] == 40
    assert os.path.exists(out) and n2n.load_model(os.fsdecode(out)).shapes["fc1"] == (40,)
