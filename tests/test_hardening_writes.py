"""Issue 12, the write side: outputs, shards, signals and permissions under hostile conditions.

Each test names the item of the issue it guards. They were written against an adversarial run
of the tool (CI systems run it as root, on files downloaded from model hubs); every one of
them fails on the code before the fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load, load_file, save_file

from conftest import REPO, example_paths, n2n_exe
from n2nsurgery.cli import app
from n2nsurgery.errors import N2NError
from n2nsurgery.shards import INDEX_NAME, parse_size, write_sharded

WIDEN = ["widen", "--layer", "fc1", "--width", "40"]


def widen_args(out, *extra) -> list:
    ckpt, arch = example_paths("mlp")
    return [WIDEN[0], ckpt, *WIDEN[1:], "--arch", arch, "-o", str(out), *extra]


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> bytes:
    """The bytes of the plain widening every written output must match."""
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("expected") / "out.safetensors"
    r = CliRunner().invoke(app, widen_args(out))
    assert r.exit_code == 0, r.stderr
    return out.read_bytes()


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _plain_error(r) -> str:
    """The one-line error of an exit-2 run, checked to carry no traceback."""
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


# ------------------------------------------------------------- 1. replacing a shard folder


@pytest.mark.parametrize("entry", ["model-00001-of-00001.safetensors", INDEX_NAME])
def test_a_sub_folder_named_like_a_shard_is_never_deleted(runner, tmp_path, entry):
    out = tmp_path / "out"
    (out / entry).mkdir(parents=True)
    (out / entry / "notes.txt").write_text("mine")
    r = runner.invoke(app, widen_args(out, "--max-shard-size", "1GB"))
    assert entry in _plain_error(r)
    assert (out / entry / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # refused before any work: no temporary folder


def test_a_link_named_like_a_shard_is_refused(runner, tmp_path):
    out, mine = tmp_path / "out", tmp_path / "mine.txt"
    out.mkdir()
    mine.write_text("mine")
    (out / "model-00001-of-00002.safetensors").symlink_to(mine)
    r = runner.invoke(app, widen_args(out, "--max-shard-size", "1GB"))
    assert "model-00001-of-00002.safetensors" in _plain_error(r)
    assert os.path.islink(out / "model-00001-of-00002.safetensors") and mine.read_text() == "mine"


def test_a_folder_of_our_own_shards_is_still_replaced(runner, tmp_path):
    out = tmp_path / "out"
    assert runner.invoke(app, widen_args(out, "--max-shard-size", "1KB")).exit_code == 0
    r = runner.invoke(app, widen_args(out, "--max-shard-size", "2KB"))
    assert r.exit_code == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_removing_the_replaced_folder_keeps_what_appeared_in_it(tmp_path):
    """Between the check and the swap a file may appear: only n2n's own files are deleted."""
    from n2nsurgery.shards import _remove_old

    old = tmp_path / "old"
    old.mkdir()
    (old / INDEX_NAME).write_text("{}")
    (old / "model-00001-of-00001.safetensors").write_bytes(b"x")
    (old / "late.txt").write_text("mine")
    _remove_old(str(old))
    assert os.listdir(old) == ["late.txt"]


# ------------------------------------------------------------------- 2. stdout is an input


def test_stdout_appending_to_the_input_is_refused(tmp_path):
    ckpt, arch = example_paths("mlp")
    src = tmp_path / "in.safetensors"
    src.write_bytes(open(ckpt, "rb").read())
    before = sha(src)
    for extra in ([], ["--overwrite-input"]):  # --overwrite-input does not apply to a stream
        with open(src, "ab") as out:
            p = subprocess.run([n2n_exe(), *WIDEN[:1], str(src), *WIDEN[1:], "--arch", arch, "-o", "-", *extra],
                               stdout=out, stderr=subprocess.PIPE, timeout=120)
        assert p.returncode == 2, p.stderr.decode()
        assert b"standard output is the input" in p.stderr and b"Traceback" not in p.stderr
        assert sha(src) == before


def test_stdout_to_another_file_still_works(tmp_path, expected):
    ckpt, arch = example_paths("mlp")
    with open(tmp_path / "out.safetensors", "wb") as out:
        p = subprocess.run([n2n_exe(), *widen_args("-")], stdout=out, stderr=subprocess.PIPE, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert (tmp_path / "out.safetensors").read_bytes() == expected


# ------------------------------------------------------------ 3. outputs that are not files


def test_a_character_device_is_written_through_not_replaced(runner, tmp_path):
    null = tmp_path / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers, in tmp_path
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device node here ({e})")
    r = runner.invoke(app, widen_args(null))
    assert r.exit_code == 0, r.stderr
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.lstat(null).st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(tmp_path)) == ["null"]


def test_a_block_device_is_refused(runner, tmp_path):
    node = tmp_path / "disk"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 200))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device node here ({e})")
    assert "block device" in _plain_error(runner.invoke(app, widen_args(node)))
    assert stat.S_ISBLK(os.lstat(node).st_mode)


def test_a_fifo_gets_the_checkpoint(runner, tmp_path, expected):
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    got = {}

    def read():
        with open(fifo, "rb") as f:  # blocks until the writer opens the other end
            got["data"] = f.read()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    r = runner.invoke(app, widen_args(fifo))
    reader.join(timeout=60)
    assert r.exit_code == 0, r.stderr
    assert got["data"] == expected
    assert load(got["data"])["fc1.weight"].shape == (40, 16)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["p"]


def test_sharded_output_to_a_fifo_is_refused(runner, tmp_path):
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    assert "not a folder" in _plain_error(runner.invoke(app, widen_args(fifo, "--max-shard-size", "1KB")))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_symlink_is_followed_and_stays_a_link(runner, tmp_path, expected):
    target, link = tmp_path / "real.safetensors", tmp_path / "link.safetensors"
    target.write_bytes(b"old")
    link.symlink_to(target.name)
    r = runner.invoke(app, widen_args(link))
    assert r.exit_code == 0, r.stderr
    assert os.path.islink(link) and os.readlink(link) == target.name
    assert target.read_bytes() == expected
    assert sorted(os.listdir(tmp_path)) == ["link.safetensors", "real.safetensors"]


def test_a_dangling_symlink_is_refused(runner, tmp_path):
    link = tmp_path / "link.safetensors"
    link.symlink_to("nowhere.safetensors")
    assert "does not exist" in _plain_error(runner.invoke(app, widen_args(link)))
    assert os.path.islink(link) and not (tmp_path / "nowhere.safetensors").exists()


def test_a_rename_never_lands_on_a_non_file(tmp_path, monkeypatch):
    """A FIFO appearing at the destination during the write: refused, and it stays a FIFO."""
    import n2nsurgery.checkpoint as ck

    dest = tmp_path / "out.safetensors"
    real = ck.stream_checkpoint

    def then_a_fifo(*args):
        real(*args)
        os.mkfifo(dest)

    monkeypatch.setattr(ck, "stream_checkpoint", then_a_fifo)
    with pytest.raises(N2NError, match="no longer a regular file"):
        ck.write_checkpoint(str(dest), {"w": torch.ones(2)}, {})
    assert stat.S_ISFIFO(os.lstat(dest).st_mode)
    assert os.listdir(tmp_path) == ["out.safetensors"]


# ------------------------------------------------------------------------------ 4. SIGTERM

BIG_YAML = """format: n2n-arch/1
inputs:
  x: {shape: [2048], dtype: float32}
nodes:
  - {name: fc1, op: linear, in: x}
  - {name: relu1, op: relu, in: fc1}
  - {name: fc2, op: linear, in: relu1}
outputs: [fc2]
"""


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "sharded"])
def test_sigterm_while_writing_leaves_no_temporary_file(tmp_path, sharded):
    g = torch.Generator().manual_seed(0)
    ckpt, arch = tmp_path / "in" / "big.safetensors", tmp_path / "in" / "big.yaml"
    ckpt.parent.mkdir()
    save_file({"fc1.weight": torch.randn(4096, 2048, generator=g), "fc1.bias": torch.zeros(4096),
               "fc2.weight": torch.randn(10, 4096, generator=g), "fc2.bias": torch.zeros(10)}, str(ckpt))
    arch.write_text(BIG_YAML)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / ("student" if sharded else "student.safetensors")
    cmd = [n2n_exe(), "-q", "widen", str(ckpt), "--arch", str(arch), "--layer", "fc1", "--width", "8192",
           "--no-verify", "-o", str(dest), *(["--max-shard-size", "20MB"] if sharded else [])]
    outcomes = []
    for delay in (0.0, 0.0, 0.02, 0.1):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = time.monotonic()
        while proc.poll() is None and not os.listdir(out_dir) and time.monotonic() - start < 120:
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        outcomes.append(proc.returncode)
        if proc.returncode == 0:  # finished before the signal: a complete output
            if sharded:
                shutil.rmtree(dest)
            else:
                load_file(str(dest))
                dest.unlink()
            continue
        assert proc.returncode == 143, err.decode()
        assert b"interrupted; nothing was written" in err and b"Traceback" not in err
        assert os.listdir(out_dir) == [], "a temporary file or a partial output was left behind"
    assert 143 in outcomes, f"no SIGTERM landed during a write: {outcomes}"


# ------------------------------------------------------------------------- 5. long names


def test_a_legal_250_byte_name_is_written(runner, tmp_path, expected):
    name = "x" * (250 - len(".safetensors")) + ".safetensors"
    r = runner.invoke(app, widen_args(tmp_path / name))
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / name).read_bytes() == expected
    assert os.listdir(tmp_path) == [name]


def test_a_legal_250_byte_folder_name_is_written_twice(runner, tmp_path):
    name = "y" * 250
    for _ in range(2):  # the second replaces the first, through a ".old" folder
        r = runner.invoke(app, widen_args(tmp_path / name, "--max-shard-size", "1KB"))
        assert r.exit_code == 0, r.stderr
    assert os.listdir(tmp_path) == [name]


# -------------------------------------------------------------------------- 6. permissions


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_private_input_gives_a_private_output(runner, tmp_path, umask022):
    ckpt, arch = example_paths("mlp")
    src = tmp_path / "in.safetensors"
    src.write_bytes(open(ckpt, "rb").read())
    src.chmod(0o600)
    r = runner.invoke(app, [WIDEN[0], str(src), *WIDEN[1:], "--arch", arch, "-o", str(tmp_path / "out.safetensors")])
    assert r.exit_code == 0, r.stderr
    assert _mode(tmp_path / "out.safetensors") == 0o600
    r = runner.invoke(app, [WIDEN[0], str(src), *WIDEN[1:], "--arch", arch, "-o", str(tmp_path / "sh"), "--max-shard-size", "1KB"])
    assert r.exit_code == 0, r.stderr
    assert _mode(tmp_path / "sh") == 0o700
    assert {_mode(tmp_path / "sh" / n) for n in os.listdir(tmp_path / "sh")} == {0o600}


def test_a_replaced_output_keeps_its_mode(runner, tmp_path, umask022):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o600)
    assert runner.invoke(app, widen_args(out)).exit_code == 0
    assert _mode(out) == 0o600
    sh = tmp_path / "sh"
    assert runner.invoke(app, widen_args(sh, "--max-shard-size", "1KB")).exit_code == 0
    sh.chmod(0o750)
    for n in os.listdir(sh):
        (sh / n).chmod(0o640)
    assert runner.invoke(app, widen_args(sh, "--max-shard-size", "2KB")).exit_code == 0
    assert _mode(sh) == 0o750 and {_mode(sh / n) for n in os.listdir(sh)} == {0o640}


def test_new_outputs_take_the_inputs_mode_minus_the_umask(runner, tmp_path, umask022):
    ckpt, arch = example_paths("mlp")
    src = tmp_path / "in.safetensors"
    src.write_bytes(open(ckpt, "rb").read())
    src.chmod(0o664)
    r = runner.invoke(app, [WIDEN[0], str(src), *WIDEN[1:], "--arch", arch, "-o", str(tmp_path / "out.safetensors")])
    assert r.exit_code == 0, r.stderr
    assert _mode(tmp_path / "out.safetensors") == 0o644
    r = runner.invoke(app, [*widen_args(tmp_path / "piped.safetensors")[:1], "-", *WIDEN[1:], "--arch", arch,
                            "-o", str(tmp_path / "piped.safetensors")], input=open(ckpt, "rb").read())
    assert r.exit_code == 0, r.stderr
    assert _mode(tmp_path / "piped.safetensors") == 0o644  # standard input: 0666 minus the umask


# ------------------------------------------------------------- 7. a full or closed stdout


def test_a_full_stdout_is_a_clear_error():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "wb") as full:
        p = subprocess.run([n2n_exe(), *widen_args("-")], stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert p.returncode == 2, p.stderr.decode()
    assert p.stderr.decode().strip() == "error: cannot write to standard output: No space left on device"


def test_a_closed_stdout_is_a_clear_error():
    cmd = " ".join(f"'{a}'" for a in [n2n_exe(), *widen_args("-")]) + " >&-"
    p = subprocess.run(["bash", "-c", cmd], stderr=subprocess.PIPE, timeout=120)
    assert p.returncode == 2, p.stderr.decode()
    assert p.stderr.decode().startswith("error: cannot write to standard output: it is closed")


# ---------------------------------------------------------------- 8. many shards, few files

_MANY = 200  # linear layers: 400 tensors, so 400 shards at one tensor each


def _chain_yaml(n: int) -> str:
    nodes = "\n".join(f"  - {{name: l{i}, op: linear, in: {'x' if i == 0 else f'r{i - 1}'}}}\n"
                      f"  - {{name: r{i}, op: relu, in: l{i}}}" for i in range(n))
    return f"format: n2n-arch/1\ninputs:\n  x: {{shape: [4], dtype: float32}}\nnodes:\n{nodes}\noutputs: [r{n - 1}]\n"


_UNDER_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from n2nsurgery.cli import main
sys.argv = ["n2n", *sys.argv[1:]]
main()
"""


def test_hundreds_of_shards_read_under_a_low_open_file_limit(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(_MANY):
        sd[f"l{i}.weight"] = torch.eye(4) + torch.rand(4, 4, generator=g) / 10
        sd[f"l{i}.bias"] = torch.rand(4, generator=g) / 10
    arch = tmp_path / "chain.yaml"
    arch.write_text(_chain_yaml(_MANY))
    names = write_sharded(str(tmp_path / "many"), sd, {"format": "pt", "n2n.arch": arch.read_text()}, 1)
    assert len(names) == 2 * _MANY
    out = tmp_path / "wide.safetensors"
    run = [sys.executable, "-c", _UNDER_LIMIT]
    p = subprocess.run([*run, "-q", "widen", str(tmp_path / "many"), "--layer", "l0", "--width", "6", "-o", str(out)],
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    got = load_file(str(out))
    assert got["l0.weight"].shape == (6, 4) and torch.equal(got["l5.bias"], sd["l5.bias"])
    p = subprocess.run([*run, "-q", "widen", str(tmp_path / "many"), "--layer", "l0", "--width", "6", "--max-shard-size", "1",
                        "-o", str(tmp_path / "wide-sharded")], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()


# --------------------------------------------------------------------- 9. indexes as shards


def test_an_index_naming_itself_as_a_shard_is_refused(runner, tmp_path):
    index = tmp_path / INDEX_NAME
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": INDEX_NAME}}))
    err = _plain_error(runner.invoke(app, ["inspect", str(index)]))
    assert str(index) in err and "an index, not a shard" in err


def test_two_indexes_naming_each_other_are_refused(runner, tmp_path):
    a, b = tmp_path / "a.safetensors.index.json", tmp_path / "b.safetensors.index.json"
    a.write_text(json.dumps({"weight_map": {"w": b.name}}))
    b.write_text(json.dumps({"weight_map": {"w": a.name}}))
    err = _plain_error(runner.invoke(app, ["inspect", str(a)]))
    assert str(a) in err and "an index, not a shard" in err


# ----------------------------------------------------------------------- 10. no mmap here


def _no_mmap(*args, **kwargs):
    raise OSError(errno.ENODEV, "No such device")


def test_a_file_system_without_mmap_reads_into_memory(runner, tmp_path, monkeypatch, expected):
    monkeypatch.setattr(mmap, "mmap", _no_mmap)
    r = runner.invoke(app, widen_args(tmp_path / "out.safetensors"))
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "out.safetensors").read_bytes() == expected


def test_sharded_input_without_mmap(runner, tmp_path, monkeypatch, expected):
    assert runner.invoke(app, widen_args(tmp_path / "sh", "--max-shard-size", "1KB")).exit_code == 0
    monkeypatch.setattr(mmap, "mmap", _no_mmap)
    r = runner.invoke(app, ["widen", str(tmp_path / "sh"), "--layer", "fc1", "--width", "48", "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0, r.stderr
    assert load_file(str(tmp_path / "o.safetensors"))["fc1.weight"].shape == (48, 16)


# ------------------------------------------------------------------ 11. absurd shard sizes


@pytest.mark.parametrize("size", ["9" * 400, "1" + "0" * 30 + "GB", "2000000TiB"])
def test_absurd_shard_sizes_are_usage_errors(runner, tmp_path, size):
    r = runner.invoke(app, widen_args(tmp_path / "sh", "--max-shard-size", size))
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr and "--max-shard-size" in r.stderr
    assert not (tmp_path / "sh").exists()


def test_parse_size_bounds():
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("0.5KiB") == 512
    assert parse_size(str(1024**6)) == 1024**6  # 1 EiB: the largest accepted
    for bad in (1024**6 + 1, "1" * 400, 10**30):
        with pytest.raises(N2NError, match="more than any file can hold"):
            parse_size(bad)


# -------------------------------------------------------------------- 12. no import cycle


@pytest.mark.parametrize("module", ["n2nsurgery.checkpoint", "n2nsurgery.shards", "n2nsurgery.storage"])
def test_each_storage_module_imports_alone(module):
    p = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr.decode()


def test_checkpoint_does_not_import_shards():
    """shards imports checkpoint; the other way round would be a cycle (storage sits above both)."""
    import n2nsurgery.checkpoint

    with open(n2nsurgery.checkpoint.__file__) as f:
        text = f.read()
    assert not re.search(r"^\s*(from\s+\.(shards|storage)\s+import|import\s+n2nsurgery\.(shards|storage))", text, re.M)


def test_open_any_opens_files_and_folders(runner, tmp_path):
    from n2nsurgery.storage import open_any

    assert runner.invoke(app, widen_args(tmp_path / "sh", "--max-shard-size", "1KB")).exit_code == 0
    ckpt = example_paths("mlp")[0]
    assert open_any(ckpt).shape("fc1.weight") == (32, 16)
    assert open_any(str(tmp_path / "sh")).shape("fc1.weight") == (40, 16)
    assert open_any(str(tmp_path / "sh" / INDEX_NAME)).shape("fc1.weight") == (40, 16)
