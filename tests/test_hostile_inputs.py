"""Hostile inputs (issue 12): files built to crash, hang or exhaust the tool.

CI systems run n2n as root on files downloaded from model hubs. Each case here once crashed
(exit 3, "internal error"), hung, or grew to gigabytes; each must now be refused with exit 2 and
one line naming the file, in bounded time and memory. The files are built in tmp_path by small
helpers (a header of a given JSON text, a YAML text). Cases whose regression would hang or eat
memory run in a subprocess with a timeout and an address-space limit, or in-process under a
temporarily lowered RLIMIT_AS, so a regression fails fast instead of stalling the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import struct
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import example_paths, n2n_exe
import n2nsurgery.checkpoint as checkpoint_module
from n2nsurgery.checkpoint import open_checkpoint
from n2nsurgery.cli import app
from n2nsurgery.errors import N2NError
from n2nsurgery.guards import count_nonfinite

MLP_CKPT, MLP_ARCH = example_paths("mlp")
MLP_BYTES = Path(MLP_CKPT).read_bytes()
_HLEN = struct.unpack("<Q", MLP_BYTES[:8])[0]
MLP_HEADER = json.loads(MLP_BYTES[8 : 8 + _HLEN])
MLP_DATA = MLP_BYTES[8 + _HLEN :]
MLP_YAML = Path(MLP_ARCH).read_text()

# A "billion laughs" document: nine aliases of nine aliases... Small here (9**3 leaves); the
# refusal happens at the first alias whatever the size.
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n'
DEEP = 100_000


# ----------------------------------------------------------------------------------- helpers


def refused(result, *fragments):
    """Exit 2, one `error:` line on stderr holding every fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def with_header(tmp_path, header_text: str, data: bytes = MLP_DATA, name: str = "hostile.safetensors") -> str:
    """A file of 8-byte length, `header_text` (as given, not re-serialised) and `data`."""
    raw = header_text.encode("utf-8")
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def mlp_header_text(metadata=None) -> str:
    """The MLP example's header as JSON text, with `metadata` as its __metadata__."""
    header = dict(MLP_HEADER)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    return json.dumps(header)


def write_text(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@contextlib.contextmanager
def address_space_headroom(extra: int = 1 << 30):
    """Lower this process's RLIMIT_AS to what it maps now plus `extra`, for the block only:
    a reader that regresses to reading without bound gets MemoryError, not the machine's RAM."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_bounded(args, stdin=None, timeout=60, memory=3 << 30):
    """The real `n2n` in a subprocess, with a wall-clock timeout and an address-space limit."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([n2n_exe(), *args], stdin=stdin if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, preexec_fn=limit)


def refused_proc(proc, *fragments):
    err = proc.stderr.decode("utf-8", "replace").strip()
    assert proc.returncode == 2, (proc.returncode, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"


# ------------------------------------------------------------------ 1. YAML alias bombs


def test_alias_bomb_in_architecture_file(runner, tmp_path):
    arch = write_text(tmp_path, "bomb.yaml", BOMB + MLP_YAML)
    refused(runner.invoke(app, ["inspect", MLP_CKPT, "--arch", arch]), "bomb.yaml", "line 2", "aliases (*a) are not accepted")


def test_alias_bomb_in_recipe(runner, tmp_path):
    recipe = write_text(tmp_path, "bomb-recipe.yaml", BOMB.replace("a:", "x:", 1) + "steps: [{widen: {layer: fc1, width: 40}}]\n")
    out = tmp_path / "out.safetensors"
    refused(runner.invoke(app, ["apply", MLP_CKPT, recipe, "--arch", MLP_ARCH, "-o", str(out)]), "bomb-recipe.yaml", "aliases")
    assert not out.exists()


def test_alias_bomb_in_checkpoint_arch_metadata(runner, tmp_path):
    ckpt = with_header(tmp_path, mlp_header_text({"n2n.arch": BOMB + MLP_YAML}))
    refused(runner.invoke(app, ["inspect", ckpt]), "hostile.safetensors (its n2n.arch metadata)", "line 2", "aliases")


def test_merge_keys_are_aliases_too(runner, tmp_path):
    text = MLP_YAML.replace("  x: {shape: [16], dtype: float32}", "  x: &spec {shape: [16], dtype: float32}\n  y: {<<: *spec}")
    refused(runner.invoke(app, ["inspect", MLP_CKPT, "--arch", write_text(tmp_path, "merge.yaml", text)]), "merge.yaml", "aliases (*spec)")


# ------------------------------------------------------------------ 2. nesting 100,000 deep


def test_deep_yaml_architecture(runner, tmp_path):
    arch = write_text(tmp_path, "deep.yaml", MLP_YAML + "name: " + "[" * DEEP + "]" * DEEP + "\n")
    refused(runner.invoke(app, ["inspect", MLP_CKPT, "--arch", arch]), "deep.yaml", "nested deeper than 64 levels")


def test_deep_yaml_in_block_style(runner, tmp_path):
    block = "".join("  " * i + "-\n" for i in range(1, 200))
    recipe = write_text(tmp_path, "deep-recipe.yaml", "steps:\n" + block)
    refused(runner.invoke(app, ["apply", MLP_CKPT, recipe, "--arch", MLP_ARCH, "-o", str(tmp_path / "o.safetensors")]),
            "deep-recipe.yaml", "nested deeper than 64 levels")


def test_deep_json_in_header(runner, tmp_path):
    header = mlp_header_text()[:-1] + ', "x": ' + "[" * DEEP + "]" * DEEP + "}"
    refused(runner.invoke(app, ["inspect", with_header(tmp_path, header), "--arch", MLP_ARCH]), "hostile.safetensors", "nested deeper")


@pytest.mark.parametrize("depth", [100, DEEP])
def test_deep_json_in_history(runner, tmp_path, depth):
    ckpt = with_header(tmp_path, mlp_header_text({"n2n.history": "[" * depth + "]" * depth}))
    refused(runner.invoke(app, ["inspect", ckpt, "--arch", MLP_ARCH]), "hostile.safetensors", "n2n.history", "nested deeper than 64")


def test_deep_json_in_shard_index(runner, tmp_path):
    index = write_text(tmp_path, "model.safetensors.index.json", '{"weight_map": {}, "metadata": ' + "[" * DEEP + "]" * DEEP + "}")
    refused(runner.invoke(app, ["inspect", index, "--arch", MLP_ARCH]), "model.safetensors.index.json", "nested deeper")


# ------------------------------------------------------------------ 3. integers of 5,000 digits


def test_huge_integer_in_header(runner, tmp_path):
    header = '{"t": {"dtype": "F32", "shape": [' + "1" * 5000 + '], "data_offsets": [0, 4]}}'
    refused(runner.invoke(app, ["inspect", with_header(tmp_path, header, b"\0" * 4), "--arch", MLP_ARCH]),
            "hostile.safetensors", "an integer of 5000 digits")


def test_huge_integer_in_history(runner, tmp_path):
    ckpt = with_header(tmp_path, mlp_header_text({"n2n.history": '[{"seed": ' + "9" * 5000 + "}]"}))
    refused(runner.invoke(app, ["inspect", ckpt, "--arch", MLP_ARCH]), "n2n.history", "an integer of 5000 digits")


def test_huge_integer_in_yaml(runner, tmp_path):
    text = MLP_YAML.replace("  x: {shape: [16], dtype: float32}", "  x: {shape: [16], dtype: float32}\n  ids: {shape: [4], dtype: int64, high: " + "7" * 5000 + "}")
    refused(runner.invoke(app, ["inspect", MLP_CKPT, "--arch", write_text(tmp_path, "digits.yaml", text)]),
            "digits.yaml", "line 5", "an integer of 5000 digits")


def test_impossible_date_in_yaml(runner, tmp_path):
    """PyYAML reads 2024-13-45 as a date and raises ValueError: malformed YAML, at its line."""
    text = MLP_YAML.replace("name: mlp", "name: 2024-13-45")
    refused(runner.invoke(app, ["inspect", MLP_CKPT, "--arch", write_text(tmp_path, "date.yaml", text)]), "date.yaml", "line 2")


def test_shape_whose_element_count_overflows_int64(tmp_path):
    """[0, 2**62, 2**62] has no elements (so no bytes), but torch cannot hold its strides."""
    header = '{"t": {"dtype": "F32", "shape": [0, 4611686018427387904, 4611686018427387904], "data_offsets": [0, 0]}}'
    with pytest.raises(N2NError, match="more than 2\\*\\*63 elements"):
        open_checkpoint(with_header(tmp_path, header, b""))


# ------------------------------------------------------------------ 4. `high` and attributes beyond int64


def _arch_with_int_input(high) -> str:
    return MLP_YAML.replace("  x: {shape: [16], dtype: float32}", f"  x: {{shape: [16], dtype: float32}}\n  ids: {{shape: [4], dtype: int64, high: {high}}}")


@pytest.mark.parametrize("high", [2**63, 2**64 + 1])
def test_high_beyond_what_randint_takes(runner, tmp_path, high):
    arch = write_text(tmp_path, "high.yaml", _arch_with_int_input(high))
    refused(runner.invoke(app, ["verify", MLP_CKPT, MLP_CKPT, "--arch", arch]), "high.yaml", "input 'ids'", f"use at most {2**63 - 1}")


def test_high_at_the_int64_limit_verifies(runner, tmp_path):
    arch = write_text(tmp_path, "high.yaml", _arch_with_int_input(2**63 - 1))
    assert runner.invoke(app, ["verify", MLP_CKPT, MLP_CKPT, "--arch", arch]).exit_code == 0


@pytest.mark.parametrize("attr", ["padding: 36893488147419103232", "stride: [1, 9223372036854775808]"])
def test_integer_attribute_beyond_int64(runner, tmp_path, attr):
    ckpt, arch_path = example_paths("cnn")
    text = Path(arch_path).read_text().replace("{name: conv1, op: conv2d, in: x, padding: 1}", "{name: conv1, op: conv2d, in: x, " + attr + "}")
    assert attr in text
    refused(runner.invoke(app, ["inspect", ckpt, "--arch", write_text(tmp_path, "attr.yaml", text)]),
            "attr.yaml", "node 'conv1'", "beyond what torch can take")


# ------------------------------------------------------------------ 5. keys written twice


def test_two_metadata_objects(runner, tmp_path):
    header = mlp_header_text({"n2n.arch": MLP_YAML})[:-1] + ', "__metadata__": {"format": "pt"}}'
    refused(runner.invoke(app, ["inspect", with_header(tmp_path, header)]), "hostile.safetensors", "'__metadata__' is written twice")


def test_same_tensor_twice(runner, tmp_path):
    header = mlp_header_text()[:-1] + ', "fc1.bias": ' + json.dumps(MLP_HEADER["fc1.bias"]) + "}"
    refused(runner.invoke(app, ["inspect", with_header(tmp_path, header), "--arch", MLP_ARCH]), "'fc1.bias' is written twice")


def test_key_twice_inside_an_entry(runner, tmp_path):
    entry = json.dumps(MLP_HEADER["fc1.bias"])[:-1] + ', "dtype": "F16"}'
    header = mlp_header_text()[:-1] + ', "fc1.bias": ' + entry + "}"
    header = header.replace('"fc1.bias": ' + json.dumps(MLP_HEADER["fc1.bias"]) + ", ", "", 1)
    refused(runner.invoke(app, ["inspect", with_header(tmp_path, header), "--arch", MLP_ARCH]), "'dtype' is written twice")


def test_same_key_twice_in_shard_index(runner, tmp_path):
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(MLP_BYTES)
    entries = ", ".join(f'"{k}": "model-00001-of-00001.safetensors"' for k in MLP_HEADER if k != "__metadata__")
    index = write_text(tmp_path, "model.safetensors.index.json",
                       '{"weight_map": {' + entries + ', "fc1.bias": "model-00001-of-00001.safetensors"}}')
    refused(runner.invoke(app, ["inspect", index, "--arch", MLP_ARCH]), "model.safetensors.index.json", "'fc1.bias' is written twice")


# ------------------------------------------------------------------ 6. millions of tiny tensors


def test_absurd_tensor_count_is_refused_before_parsing(tmp_path):
    """1,000,001 empty tensors (55 MB of header, under the format's 100 MB cap) took a minute
    and gigabytes to parse; now the count is refused first. A subprocess with a memory limit,
    so a regression fails instead of swapping."""
    limit = checkpoint_module.MAX_TENSORS
    entry = '"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    header = "{" + ",".join(entry % i for i in range(limit + 1)) + "}"
    path = with_header(tmp_path, header, b"", name="many.safetensors")
    del header
    proc = run_bounded(["inspect", path, "--arch", MLP_ARCH], memory=2 << 30)
    refused_proc(proc, "many.safetensors", f"{limit + 1} tensors", f"more than the {limit}")


# ------------------------------------------------------------------ 7. special files


def test_stdin_from_dev_zero_is_refused_after_8_bytes():
    with open("/dev/zero", "rb") as zero:
        refused_proc(run_bounded(["inspect", "-", "--arch", MLP_ARCH], stdin=zero), "<stdin>", "header length 0 is implausible")


@pytest.mark.parametrize("how", ["path", "symlink"])
def test_dev_zero_as_checkpoint(runner, tmp_path, how):
    path = "/dev/zero"
    if how == "symlink":
        (tmp_path / "model.safetensors").symlink_to("/dev/zero")
        path = str(tmp_path / "model.safetensors")
    with address_space_headroom():
        result = runner.invoke(app, ["inspect", path, "--arch", MLP_ARCH])
    refused(result, path, "implausible")


def test_dev_urandom_as_checkpoint(runner):
    with address_space_headroom():
        result = runner.invoke(app, ["inspect", "/dev/urandom", "--arch", MLP_ARCH])
    refused(result, "/dev/urandom", "not a safetensors file")


def test_stream_whose_header_is_valid_reads_only_what_it_describes(monkeypatch):
    """A valid header followed by endless bytes: exactly the described data is read, then the
    surplus is refused (not read to the end of a stream that has none)."""
    class Endless:
        def __init__(self):
            self.head = MLP_BYTES

        def read(self, n=-1):
            if self.head:
                chunk, self.head = self.head[:n], self.head[n:]
                return chunk
            return b"\0" * min(n, 1 << 20)

    class Stdin:
        buffer = Endless()

        def isatty(self):
            return False

    monkeypatch.setattr("sys.stdin", Stdin())
    with address_space_headroom(), pytest.raises(N2NError, match="<stdin>: corrupt: more bytes follow the last tensor"):
        open_checkpoint("-")


def test_dev_zero_as_architecture_and_recipe(runner, tmp_path):
    with address_space_headroom():
        arch = runner.invoke(app, ["inspect", MLP_CKPT, "--arch", "/dev/zero"])
        recipe = runner.invoke(app, ["apply", MLP_CKPT, "/dev/zero", "--arch", MLP_ARCH, "-o", str(tmp_path / "o.safetensors")])
    refused(arch, "/dev/zero", "larger than 16 MiB")
    refused(recipe, "/dev/zero", "larger than 16 MiB")


def test_dev_zero_as_recipe_on_stdin(tmp_path):
    with open("/dev/zero", "rb") as zero:
        proc = run_bounded(["apply", MLP_CKPT, "-", "--arch", MLP_ARCH, "-o", str(tmp_path / "o.safetensors")], stdin=zero)
    refused_proc(proc, "<stdin>", "larger than 16 MiB")


@pytest.mark.parametrize("role", ["checkpoint", "architecture"])
def test_fifo_without_a_writer_is_empty_not_a_hang(tmp_path, role):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    args = ["inspect", str(fifo), "--arch", MLP_ARCH] if role == "checkpoint" else ["inspect", MLP_CKPT, "--arch", str(fifo)]
    refused_proc(run_bounded(args, timeout=60), str(fifo), "empty")


def test_fifo_with_a_writer_is_read(tmp_path):
    """A FIFO opened without blocking must still wait for the data of a writer that is there."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:  # blocks until n2n opens the FIFO for reading
            f.write(MLP_BYTES)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        proc = run_bounded(["inspect", str(fifo), "--arch", MLP_ARCH], timeout=60)
    finally:
        if writer.is_alive():  # n2n never opened it: let the writer's open() return
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(10)
    assert proc.returncode == 0, proc.stderr.decode()


# ------------------------------------------------------------------ 8. PyTorch pickles


@pytest.fixture
def no_unpickling(monkeypatch):
    """Unpickling a downloaded file can run any code: make sure nothing tries."""
    def boom(*args, **kwargs):
        raise AssertionError("something tried to unpickle the input")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle"])
@pytest.mark.parametrize("via", ["path", "stdin"])
def test_pytorch_pickle_is_named_with_the_conversion(runner, tmp_path, no_unpickling, kind, via):
    path = tmp_path / ("model.pt" if kind != "raw-pickle" else "pytorch_model.bin")
    sd = load_file(MLP_CKPT)
    if kind == "zip":
        torch.save(sd, path)
    elif kind == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({k: v.tolist() for k, v in sd.items()}, protocol=4))
    if via == "path":
        result = runner.invoke(app, ["inspect", str(path), "--arch", MLP_ARCH])
        where = str(path)
    else:
        result = runner.invoke(app, ["inspect", "-", "--arch", MLP_ARCH], input=path.read_bytes())
        where = "<stdin>"
    refused(result, where, "looks like a PyTorch", "never unpickles", "save_file(torch.load('model.pt'")


def test_other_zip_archive_is_not_called_a_pickle(runner, tmp_path):
    path = tmp_path / "weights.safetensors"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    refused(runner.invoke(app, ["inspect", str(path), "--arch", MLP_ARCH]), "weights.safetensors", "is a zip archive")


def test_safetensors_whose_length_starts_like_a_pickle_still_reads(tmp_path):
    """A header of 640 bytes has the length bytes 80 02 ..., which is also how a protocol-2
    pickle starts: the safetensors reading wins when the header is there."""
    text = mlp_header_text()
    text = text[:-1] + " " * (0x280 - len(text.encode()) - 1) + "}"
    ckpt = open_checkpoint(with_header(tmp_path, text))
    assert sorted(ckpt.keys()) == sorted(k for k in MLP_HEADER if k != "__metadata__")


# ------------------------------------------------------------------ 9. zero units, float8


def _mlp_variant(tmp_path, name: str, edit) -> str:
    sd = load_file(MLP_CKPT)
    sd = edit(sd) or sd
    path = tmp_path / name
    save_file(sd, str(path))
    return str(path)


def _zero_units(sd):
    sd["fc1.weight"] = torch.zeros(0, 16)
    sd["fc1.bias"] = torch.zeros(0)
    sd["fc2.weight"] = torch.zeros(32, 0)


@pytest.mark.parametrize("command", ["inspect", "widen", "verify"])
def test_layer_with_zero_units(runner, tmp_path, command):
    ckpt = _mlp_variant(tmp_path, "zero.safetensors", _zero_units)
    args = {
        "inspect": ["inspect", ckpt, "--arch", MLP_ARCH],
        "widen": ["widen", ckpt, "--arch", MLP_ARCH, "--layer", "fc1", "--width", "40", "-o", str(tmp_path / "o.safetensors")],
        "verify": ["verify", ckpt, ckpt, "--arch", MLP_ARCH],
    }[command]
    refused(runner.invoke(app, args), "zero.safetensors", "node 'fc1'", "'fc1.weight' has shape [0, 16]", "no units")


FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_checkpoint_verifies(runner, tmp_path, dtype):
    ckpt = _mlp_variant(tmp_path, "f8.safetensors", lambda sd: {k: v.to(dtype) for k, v in sd.items()})
    result = runner.invoke(app, ["verify", ckpt, ckpt, "--arch", MLP_ARCH])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_widening_is_refused_as_inexact(runner, tmp_path, dtype):
    """Replicas share a consumer's weights (w/2, w/3...): float8 cannot hold the shares, so the
    widening is refused up front instead of failing verification (or, unverified, being wrong)."""
    ckpt = _mlp_variant(tmp_path, "f8.safetensors", lambda sd: {k: v.to(dtype) for k, v in sd.items()})
    out = tmp_path / "o.safetensors"
    for verify in ("--verify", "--no-verify"):
        result = runner.invoke(app, ["widen", ckpt, "--arch", MLP_ARCH, "--layer", "fc1", "--width", "40", verify, "-o", str(out)])
        refused(result, "f8.safetensors", "cannot widen 'fc1' exactly", "'fc2.weight'", "bfloat16")
    assert not out.exists()


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_deepening_is_exact(runner, tmp_path, dtype):
    ckpt = _mlp_variant(tmp_path, "f8.safetensors", lambda sd: {k: v.to(dtype) for k, v in sd.items()})
    out = tmp_path / "o.safetensors"
    result = runner.invoke(app, ["deepen", ckpt, "--arch", MLP_ARCH, "--after", "relu1", "-o", str(out)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_nan_is_counted(runner, tmp_path, dtype):
    t = torch.tensor([1.0, float("nan"), 2.0, float("nan")]).to(dtype)
    assert count_nonfinite(t) == 2

    def nan_weight(sd):
        sd = {k: v.to(dtype) for k, v in sd.items()}
        sd["fc1.weight"][0, 0] = float("nan")
        return sd

    ckpt = _mlp_variant(tmp_path, "f8nan.safetensors", nan_weight)
    refused(runner.invoke(app, ["verify", ckpt, ckpt, "--arch", MLP_ARCH]), "'fc1.weight' holds 1 NaN or Inf value")


# ------------------------------------------------------------------ 10. names


@pytest.mark.parametrize(
    "yaml_name, shown, code, position",
    [
        ('"fc1\\x07"', "'fc1\\x07'", "U+0007", 3),
        ('"f\\x7fc1"', "'f\\x7fc1'", "U+007F", 1),
        ('"fc1\\x85"', "'fc1\\x85'", "U+0085", 3),
        ('"\\ud800fc1"', "'\\ud800fc1'", "U+D800", 0),
    ],
)
def test_control_characters_and_surrogates_in_node_names(runner, tmp_path, yaml_name, shown, code, position):
    text = MLP_YAML.replace("{name: relu1, op: relu, in: fc1}", "{name: " + yaml_name + ", op: relu, in: fc1}")
    result = runner.invoke(app, ["inspect", MLP_CKPT, "--arch", write_text(tmp_path, "names.yaml", text)])
    line = refused(result, "names.yaml", "nodes[1] name", shown, code, f"at position {position}")
    assert line.isprintable()


def test_control_character_in_input_name(runner, tmp_path):
    text = MLP_YAML.replace("  x: {shape", '  "x\\x1b[2J": {shape').replace("in: x}", 'in: "x\\x1b[2J"}')
    line = refused(runner.invoke(app, ["inspect", MLP_CKPT, "--arch", write_text(tmp_path, "input.yaml", text)]),
                   "input name 'x\\x1b[2J'", "U+001B")
    assert line.isprintable()


def test_odd_characters_in_tensor_keys_do_not_crash(runner, tmp_path):
    """Names in a checkpoint header are data, not part of the architecture: an extra tensor
    whose key holds control characters is carried, and nothing crashes on it."""
    ckpt = _mlp_variant(tmp_path, "keys.safetensors", lambda sd: {**sd, "odd\x07\x85\x1b[2Jkey": torch.zeros(2)})
    result = runner.invoke(app, ["inspect", ckpt, "--arch", MLP_ARCH])
    assert result.exit_code == 0, result.output
    out = tmp_path / "o.safetensors"
    result = runner.invoke(app, ["widen", ckpt, "--arch", MLP_ARCH, "--layer", "fc1", "--width", "40", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "odd\x07\x85\x1b[2Jkey" in load_file(str(out))
