"""Checkpoint I/O (docs/format.md#checkpoints-pipes-and-exit-codes): interoperability with the safetensors library, dtypes, metadata,
atomic writes, byte-for-byte determinism across processes, stdin/stdout, and inputs left alone."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import EXAMPLE_NAMES, example_paths, n2n_exe
from n2nsurgery import load_model, model_from_state_dict, save_model
from n2nsurgery.checkpoint import LazyTensor, data_alignment, open_checkpoint, write_checkpoint
from n2nsurgery.errors import N2NError
from n2nsurgery.examples import MLP_YAML
from n2nsurgery.model import META_ARCH, META_HISTORY

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]


def _sample_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        if dt.is_floating_point:
            out[f"t.{name}"] = torch.randn(3, 5, generator=g).to(dt)
        elif dt == torch.bool:
            out[f"t.{name}"] = torch.rand(7, generator=g) > 0.5
        else:
            out[f"t.{name}"] = torch.randint(0, 200, (2, 3, 2), generator=g).to(dt)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert tuple(got[k].shape) == tuple(want[k].shape), k
        assert torch.equal(got[k], want[k]), k


# ------------------------------------------------------------------ safetensors interoperability


def test_reads_files_written_by_safetensors(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "author": "someone"})
    ckpt = open_checkpoint(str(path))
    assert ckpt.metadata == {"format": "pt", "author": "someone"}
    _assert_same_tensors({k: ckpt.get(k) for k in ckpt.keys()}, tensors)
    for k, t in tensors.items():
        assert ckpt.shape(k) == tuple(t.shape) and ckpt.dtype(k) == t.dtype


def test_files_we_write_load_with_safetensors(tmp_path):
    tensors = _sample_tensors()
    meta = {"format": "pt", "n2n.arch": "format: n2n-arch/1\n", "z": "last", "a": "first"}
    path = str(tmp_path / "ours.safetensors")
    write_checkpoint(path, tensors, meta)
    _assert_same_tensors(load_file(path), tensors)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == meta


def test_every_tensor_starts_aligned_to_its_element_size(tmp_path):
    path = str(tmp_path / "ours.safetensors")
    write_checkpoint(path, _sample_tensors(), {"format": "pt"})
    data = open(path, "rb").read()
    hlen = int.from_bytes(data[:8], "little")
    assert (8 + hlen) % 8 == 0
    header = json.loads(data[8 : 8 + hlen])
    for k, entry in header.items():
        if k != "__metadata__":
            size = _sample_tensors()[k].element_size()
            assert (8 + hlen + entry["data_offsets"][0]) % size == 0, k


def test_tensors_start_aligned_to_the_largest_power_of_two_dividing_their_size(tmp_path):
    # Why: the kernel copies untouched tensors into well-aligned offsets up to 2.5x faster.
    tensors = {
        "a.bias": torch.ones(1000),  # 4000 bytes: 32-byte class, so after the others
        "b.weight": torch.ones(64, 64),  # 16 KiB
        "c.half": torch.ones(4096, dtype=torch.float16),  # 8 KiB
        "d.odd": torch.ones(3, dtype=torch.float16),  # 6 bytes: 2-byte class, last
        "e.big": torch.ones(1024, 1024, dtype=torch.bfloat16),  # 2 MiB
        "f.empty": torch.ones(0),
    }
    path = str(tmp_path / "aligned.safetensors")
    write_checkpoint(path, tensors, {"format": "pt"})
    data = open(path, "rb").read()
    hlen = int.from_bytes(data[:8], "little")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    align = data_alignment(total)
    assert align == 8192  # 2.1 MB of tensors / 256, rounded down to a power of two
    assert (8 + hlen) % align == 0
    header = json.loads(data[8 : 8 + hlen])
    starts = {k: 8 + hlen + e["data_offsets"][0] for k, e in header.items() if k != "__metadata__"}
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        want = min(n & -n, align) if n else 1
        assert starts[k] % want == 0, k
    assert [k for k in sorted(starts, key=starts.get) if tensors[k].numel()] == ["b.weight", "c.half", "e.big", "a.bias", "d.odd"]
    _assert_same_tensors(load_file(path), tensors)


def test_data_alignment_grows_with_the_data_up_to_2_mib():
    assert data_alignment(0) == 8 and data_alignment(10_000) == 32
    assert data_alignment(1 << 20) == 4096
    assert data_alignment(512 << 20) == data_alignment(64 << 30) == 2 << 20


def test_non_contiguous_and_shared_tensors_are_written_as_values(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.t(), "row": base[1], "same": base}  # a view, a slice, and the storage itself
    path = str(tmp_path / "views.safetensors")
    write_checkpoint(path, tensors, {"format": "pt"})
    _assert_same_tensors(load_file(path), {k: v.contiguous() for k, v in tensors.items()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_save_model_keeps_dtypes(tmp_path, dtype):
    state = {k: (v.to(dtype) if k != "fc1.weight" else v) for k, v in load_file(example_paths("mlp")[0]).items()}
    if dtype == torch.int64:  # parameters must be floating; an int64 buffer rides along untouched
        state = dict(load_file(example_paths("mlp")[0]), **{"step": torch.tensor(7, dtype=torch.int64)})
    model = model_from_state_dict(MLP_YAML, state)
    path = str(tmp_path / "m.safetensors")
    save_model(model, path)
    back = load_file(path)
    _assert_same_tensors(back, state)
    again = load_model(path)
    assert {k: again.tensors.dtype(k) for k in again.tensors.keys()} == {k: v.dtype for k, v in state.items()}


def test_unsigned_buffers_ride_along_untouched(tmp_path):
    """A uint16/32/64 tensor the graph does not use (e.g. a tokenizer table) is copied as is."""
    if not hasattr(torch, "uint16"):
        pytest.skip("this torch has no uint16")
    state = dict(load_file(example_paths("mlp")[0]), table=torch.arange(6).to(torch.uint16), ids=torch.arange(3).to(torch.uint32))
    src = str(tmp_path / "in.safetensors")
    save_file(state, src, metadata={"format": "pt"})
    out = str(tmp_path / "out.safetensors")
    save_model(load_model(src, example_paths("mlp")[1]), out)
    _assert_same_tensors(load_file(out), state)


# ------------------------------------------------------------------------------------ metadata


def test_saved_model_carries_its_architecture_and_history(tmp_path):
    ckpt, arch = example_paths("cnn")
    model = load_model(ckpt, arch)
    model.history.append({"op": "test", "args": {"x": 1}})
    out = str(tmp_path / "cnn.safetensors")
    save_model(model, out)
    with safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta[META_ARCH] == model.arch.to_yaml()
    assert json.loads(meta[META_HISTORY]) == [{"op": "test", "args": {"x": 1}}]
    back = load_model(out)  # no --arch: it comes from the metadata
    assert back.arch.to_yaml() == model.arch.to_yaml()
    assert back.history == model.history
    assert back.shapes == model.shapes


def test_explicit_arch_wins_over_embedded(tmp_path):
    ckpt, arch = example_paths("mlp")
    out = str(tmp_path / "mlp.safetensors")
    save_model(load_model(ckpt, arch), out)
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(MLP_YAML.replace("name: mlp", "name: other"))
    assert load_model(out).arch.name == "mlp"
    assert load_model(out, str(renamed)).arch.name == "other"


def test_foreign_metadata_is_carried_through(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file(load_file(example_paths("mlp")[0]), str(src), metadata={"format": "pt", "license": "MIT"})
    out = str(tmp_path / "out.safetensors")
    save_model(load_model(str(src), example_paths("mlp")[1]), out)
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["license"] == "MIT"


def test_arch_round_trips_through_yaml():
    for name in EXAMPLE_NAMES:
        model = load_model(*example_paths(name))
        from n2nsurgery import parse_architecture

        again = parse_architecture(model.arch.to_yaml())
        assert again.to_yaml() == model.arch.to_yaml()
        assert [n.name for n in again.nodes] == [n.name for n in model.arch.nodes]


# ------------------------------------------------------------------------------ atomic writes


def _failing_tensors():
    def boom():
        raise RuntimeError("disk on fire")

    # Written larger-element-size first: the float64 goes out before the failing float32.
    return {"a": torch.ones(1000, dtype=torch.float64), "b": LazyTensor(torch.float32, (4,), boom)}


def test_failed_write_leaves_nothing(tmp_path):
    dest = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint(str(dest), _failing_tensors(), {"format": "pt"})
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    dest = tmp_path / "out.safetensors"
    write_checkpoint(str(dest), {"w": torch.ones(3)}, {"format": "pt"})
    before = _sha(dest)
    with pytest.raises(RuntimeError):
        write_checkpoint(str(dest), _failing_tensors(), {"format": "pt"})
    assert _sha(dest) == before
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_only_a_write_that_replaces_a_file_is_synced(tmp_path, monkeypatch):
    # A new output lost to a power cut costs a rerun; a replaced one could cost the old file.
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    dest = str(tmp_path / "out.safetensors")
    write_checkpoint(dest, {"w": torch.ones(3)}, {"format": "pt"})
    assert synced == []
    write_checkpoint(dest, {"w": torch.zeros(3)}, {"format": "pt"})
    assert len(synced) == 1
    assert torch.equal(load_file(dest)["w"], torch.zeros(3))


def test_write_into_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(N2NError, match="does not exist"):
        write_checkpoint(str(tmp_path / "no" / "out.safetensors"), {"w": torch.ones(1)}, {})


def test_written_file_gets_the_usual_mode(tmp_path):
    dest = tmp_path / "out.safetensors"
    write_checkpoint(str(dest), {"w": torch.ones(1)}, {})
    umask = os.umask(0)
    os.umask(umask)
    assert (dest.stat().st_mode & 0o777) == (0o666 & ~umask)


# ----------------------------------------------------------------------------- determinism

_SAVE_SCRIPT = textwrap.dedent(
    """
    import sys
    from n2nsurgery import load_model, save_model
    model = load_model(sys.argv[1], sys.argv[2])
    model.history.append({"op": "widen", "args": {"layer": "conv1", "width": 12}, "seed": 0, "zeta": 1, "alpha": 2})
    model.metadata.update({"k3": "c", "k1": "a", "k2": "b"})
    save_model(model, sys.argv[3])
    """
)


def test_same_input_same_bytes_across_processes(tmp_path):
    ckpt, arch = example_paths("resnet")
    outs = []
    for i, hashseed in enumerate(["1", "12345"]):  # different hash seeds: different dict/set orders
        out = str(tmp_path / f"out{i}.safetensors")
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, ckpt, arch, out], check=True, env=env, timeout=120)
        outs.append(open(out, "rb").read())
    assert outs[0] == outs[1]
    # Two processes could agree by chance; the header's key order is what makes them agree always.
    hlen = int.from_bytes(outs[0][:8], "little")
    header = json.loads(outs[0][8 : 8 + hlen], object_pairs_hook=lambda pairs: pairs)
    assert [k for k, _ in header] == sorted(k for k, _ in header)
    meta = dict(header)["__metadata__"]
    assert [k for k, _ in meta] == sorted(k for k, _ in meta)
    with safe_open(str(tmp_path / "out0.safetensors"), framework="pt") as f:
        assert len(f.metadata()) >= 5  # enough keys that an unsorted header would show


# ------------------------------------------------------------------------------- stdin/stdout


class _FakeStdout:
    def __init__(self, tty: bool):
        self.buffer = io.BytesIO()
        self._tty = tty

    def isatty(self):
        return self._tty

    def write(self, s):
        self.buffer.write(s.encode())

    def flush(self):
        pass


def test_refuses_to_write_binary_to_a_terminal(tmp_path, monkeypatch):
    fake = _FakeStdout(tty=True)
    monkeypatch.setattr(sys, "stdout", fake)
    model = load_model(*example_paths("mlp"))
    with pytest.raises(N2NError, match="terminal"):
        save_model(model, "-")
    assert fake.buffer.getvalue() == b""


def test_writes_to_stdout_and_reads_from_stdin(tmp_path, monkeypatch):
    model = load_model(*example_paths("mlp"))
    fake = _FakeStdout(tty=False)
    monkeypatch.setattr(sys, "stdout", fake)
    save_model(model, "-")
    monkeypatch.undo()
    data = fake.buffer.getvalue()
    file_copy = tmp_path / "file.safetensors"
    save_model(model, str(file_copy))
    assert data == file_copy.read_bytes()  # stdout gets exactly the bytes a file would

    class _FakeStdin:
        buffer = io.BytesIO(data)

        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stdin", _FakeStdin())
    back = load_model("-")
    assert back.source == "<stdin>"
    _assert_same_tensors(back.tensors.to_dict(), model.tensors.to_dict())


def test_stdin_that_is_a_terminal_is_refused(monkeypatch):
    class _Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", _Tty())
    with pytest.raises(N2NError, match="terminal"):
        open_checkpoint("-")


def test_real_pipe_between_processes(tmp_path):
    """`python -c save_model(..., '-') | n2n inspect - --json`, with real pipes."""
    ckpt, arch = example_paths("cnn")
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys; from n2nsurgery import *; save_model(load_model(sys.argv[1], sys.argv[2]), '-')", ckpt, arch],
        stdout=subprocess.PIPE,
    )
    reader = subprocess.Popen([n2n_exe(), "inspect", "-", "--json"], stdin=writer.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writer.stdout.close()  # the reader owns the pipe now
    out, err = reader.communicate(timeout=120)
    assert writer.wait(timeout=120) == 0
    assert reader.returncode == 0, err.decode()
    info = json.loads(out)
    assert info["source"] == "<stdin>" and info["name"] == "cnn"


# --------------------------------------------------------------------------- input untouched


def test_writing_into_a_loaded_tensor_never_reaches_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(open(example_paths("mlp")[0], "rb").read())
    before = _sha(path)
    ckpt = open_checkpoint(str(path))
    t = ckpt.get("fc1.weight")
    t.add_(1.0)  # writing into a loaded tensor must never reach the file
    del t, ckpt
    assert _sha(path) == before


def test_mapped_reads_equal_fresh_reads_and_never_reach_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(open(example_paths("resnet")[0], "rb").read())
    before = _sha(path)
    ckpt = open_checkpoint(str(path))
    for key in ckpt.keys():
        with ckpt.mapped(key) as t:
            assert t.dtype == ckpt.dtype(key) and tuple(t.shape) == ckpt.shape(key)
            assert torch.equal(t, ckpt.get(key)), key
            if t.is_floating_point() and t.numel():
                t.add_(1.0)  # copy-on-write: costs memory, never reaches the file
        with ckpt.mapped(key) as again:  # and the pages dropped on leaving read back from the file
            assert torch.equal(again, ckpt.get(key)), key
    del ckpt
    assert _sha(path) == before


def test_a_file_truncated_while_open_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(open(example_paths("mlp")[0], "rb").read())
    ckpt = open_checkpoint(str(path))
    last = max(ckpt.keys(), key=lambda k: ckpt.infos[k].end)
    os.truncate(path, ckpt.infos[last].start)  # another program rewrites the file meanwhile
    with pytest.raises(N2NError, match="became shorter"):
        with ckpt.mapped(last):
            pass
    with pytest.raises(N2NError, match="became shorter"):
        ckpt.get(last)


def test_commands_never_modify_their_input(runner, tmp_path):
    from n2nsurgery.cli import app

    src_ckpt, arch = example_paths("resnet")
    ckpt = tmp_path / "resnet.safetensors"
    ckpt.write_bytes(open(src_ckpt, "rb").read())
    before = _sha(ckpt), _sha(arch)
    assert runner.invoke(app, ["inspect", str(ckpt), "--arch", arch]).exit_code == 0
    assert runner.invoke(app, ["verify", str(ckpt), str(ckpt), "--arch", arch, "--device", "cpu"]).exit_code == 0
    save_model(load_model(str(ckpt), arch), str(tmp_path / "copy.safetensors"))
    assert (_sha(ckpt), _sha(arch)) == before


def test_overwriting_the_input_path_is_safe(tmp_path):
    """-o pointing at the input: the new file replaces it whole, built from the old bytes."""
    src_ckpt, arch = example_paths("cnn")
    path = tmp_path / "cnn.safetensors"
    path.write_bytes(open(src_ckpt, "rb").read())
    want = load_file(src_ckpt)
    save_model(load_model(str(path), arch), str(path))
    _assert_same_tensors(load_file(str(path)), want)
    assert os.listdir(tmp_path) == ["cnn.safetensors"]
