"""Scale: the streaming writer, sharded checkpoints, progress bars and the GPU path (small sizes).

Speed and peak memory are measured by benchmarks/bench_scale.py, never asserted here.
"""

from __future__ import annotations

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

from conftest import example_paths, n2n_exe, requires_cuda
from n2nsurgery import load_model, save_model
from n2nsurgery import progress
from n2nsurgery.checkpoint import LazyTensor, _FdSink, open_checkpoint, stream_checkpoint, write_checkpoint
from n2nsurgery.cli import app
from n2nsurgery.errors import N2NError
from n2nsurgery.shards import INDEX_NAME, open_sharded, parse_size, plan_shards, write_sharded

WIDEN = ["widen", "--layer", "fc1", "--width", "40"]


def mixed_tensors() -> dict:
    """Every dtype width, an empty tensor, a scalar and a non-contiguous view."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "a.f64": torch.randn(3, generator=g, dtype=torch.float64),
        "b.f32": torch.randn(4, 3, generator=g),
        "c.f16": torch.randn(7, generator=g).half(),
        "d.bf16": torch.randn(2, 5, generator=g).bfloat16(),
        "e.i64": torch.arange(5),
        "f.u8": torch.arange(9, dtype=torch.uint8),
        "g.bool": torch.tensor([True, False, True]),
        "h.empty": torch.empty(0, 4),
        "i.scalar": torch.tensor(2.5),
        "j.transposed": base.t(),  # not contiguous: written as its values
    }


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def file_metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------- streaming


def test_streaming_output_equals_an_in_memory_write(tmp_path):
    tensors = mixed_tensors()
    meta = {"format": "pt", "zeta": "1", "alpha": "two", "n2n.history": "[]"}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_checkpoint(str(ours), tensors, meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs), metadata=meta)
    assert_same_tensors(load_file(str(ours)), load_file(str(theirs)))
    assert file_metadata(ours) == file_metadata(theirs) == meta


def test_untouched_tensors_are_copied_from_the_file_not_fetched(tmp_path):
    """An untouched tensor travels file to file: the writer never asks for its value."""
    src = tmp_path / "src.safetensors"
    tensors = mixed_tensors()
    write_checkpoint(str(src), tensors, {"format": "pt"})
    ckpt = open_checkpoint(str(src))

    def never():
        raise AssertionError("fetch called for a tensor that has a file span")

    lazy = {k: LazyTensor(ckpt.dtype(k), ckpt.shape(k), never, ckpt.span(k)) for k in ckpt.keys()}
    out = tmp_path / "out.safetensors"
    write_checkpoint(str(out), lazy, {"format": "pt"})
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("ways", [["copy_file_range"], ["sendfile"], []], ids=["copy_file_range", "sendfile", "pread"])
def test_every_copy_path_writes_the_same_bytes(tmp_path, monkeypatch, ways):
    src = tmp_path / "src.safetensors"
    write_checkpoint(str(src), mixed_tensors(), {"format": "pt"})
    ckpt = open_checkpoint(str(src))
    lazy = {k: LazyTensor(ckpt.dtype(k), ckpt.shape(k), lambda: None, ckpt.span(k)) for k in ckpt.keys()}
    monkeypatch.setattr("n2nsurgery.checkpoint._CHUNK", 16)  # many short copies, across tensor edges
    out = tmp_path / "out.bin"
    with progress.task("test", None) as bar, open(out, "wb") as f:
        sink = _FdSink(f.fileno(), bar)
        sink._ways = [w for w in ways if hasattr(os, w)]
        stream_checkpoint(sink, lazy, {"format": "pt"})
    assert out.read_bytes() == src.read_bytes()


def test_changed_tensors_are_computed_once_while_writing(tmp_path):
    """A lazy change (what widen produces) is fetched once, by the writer, and equals the eager value."""
    ckpt_path, arch = example_paths("mlp")
    model = load_model(ckpt_path, arch)
    calls = []
    w = model.tensors.get("fc3.weight")

    def scaled():
        calls.append(1)
        return w * 2

    lazy_model = model.replace(tensors=model.tensors.with_changes({"fc3.weight": LazyTensor(w.dtype, tuple(w.shape), scaled)}))
    eager_model = model.replace(tensors=model.tensors.with_changes({"fc3.weight": w * 2}))
    calls.clear()  # replace() checks shapes only; reading a value is what counts
    save_model(lazy_model, str(tmp_path / "lazy.safetensors"))
    assert len(calls) == 1
    save_model(eager_model, str(tmp_path / "eager.safetensors"))
    assert (tmp_path / "lazy.safetensors").read_bytes() == (tmp_path / "eager.safetensors").read_bytes()
    assert torch.equal(lazy_model.tensors.get("fc3.weight"), w * 2)


def test_get_reads_fresh_tensors_that_never_reach_the_file(tmp_path):
    """get() reads into new memory (freed with the tensor), so a pass over every tensor holds one."""
    path = tmp_path / "m.safetensors"
    write_checkpoint(str(path), mixed_tensors(), {"format": "pt"})
    before = path.read_bytes()
    ckpt = open_checkpoint(str(path))
    want = load_file(str(path))
    for k in ckpt.keys():
        a, b = ckpt.get(k), ckpt.get(k)
        assert torch.equal(a, want[k]) and a.dtype == want[k].dtype, k
        if a.numel():
            assert a.data_ptr() != b.data_ptr()  # two reads, two tensors: not views of one map
            a.reshape(-1).view(torch.uint8).fill_(7)  # writing into a read tensor ...
            assert torch.equal(ckpt.get(k), want[k]), k  # ... changes neither later reads
    assert path.read_bytes() == before  # ... nor the file


def test_surgery_output_is_byte_identical_for_file_stdin_and_stdout(runner, tmp_path):
    ckpt, arch = example_paths("mlp")
    from_file = tmp_path / "a.safetensors"
    r = runner.invoke(app, [*WIDEN[:1], ckpt, *WIDEN[1:], "--arch", arch, "--no-verify", "-o", str(from_file)])
    assert r.exit_code == 0, r.output
    with open(ckpt, "rb") as f:
        r = runner.invoke(app, [*WIDEN[:1], "-", *WIDEN[1:], "--arch", arch, "--no-verify", "-o", "-"], input=f.read())
    assert r.exit_code == 0, r.stderr
    assert r.stdout_bytes == from_file.read_bytes()


SAVE_BOTH = textwrap.dedent(
    """
    import sys
    from n2nsurgery import load_model, save_model
    from n2nsurgery.widen import widen
    ckpt, arch, out = sys.argv[1:4]
    student, _ = widen(load_model(ckpt, arch), "conv1", 11, split="random", seed=5)
    save_model(student, out + "/single.safetensors")
    save_model(student, out + "/sharded", max_shard_size=700)
    """
)


def test_same_bytes_across_processes_single_and_sharded(tmp_path):
    """Two interpreters (different hash seeds) write identical files, sharded or not."""
    ckpt, arch = example_paths("cnn")
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        out.mkdir()
        env = dict(os.environ, PYTHONHASHSEED=str(i + 1))
        subprocess.run([sys.executable, "-c", SAVE_BOTH, ckpt, arch, str(out)], check=True, env=env, timeout=300)
        outs.append(out)
    a, b = outs
    assert (a / "single.safetensors").read_bytes() == (b / "single.safetensors").read_bytes()
    names = sorted(os.listdir(a / "sharded"))
    assert names == sorted(os.listdir(b / "sharded")) and len(names) > 2
    for n in names:
        assert (a / "sharded" / n).read_bytes() == (b / "sharded" / n).read_bytes(), n
    # and the sharded student is the single-file student
    assert_same_tensors(load_model(str(a / "sharded")).tensors.to_dict(), load_file(str(a / "single.safetensors")))


# --------------------------------------------------------------------------- sharded write


def test_sharded_write_index_and_shards(tmp_path):
    ckpt, arch = example_paths("resnet")
    model = load_model(ckpt, arch)
    dest = tmp_path / "out"
    limit = 4000
    names = write_sharded(str(dest), model.tensors.sources(), {"format": "pt", "n2n.arch": model.arch.to_yaml()}, limit)
    assert sorted(os.listdir(dest)) == sorted(names + [INDEX_NAME])
    assert names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
    index = json.loads((dest / INDEX_NAME).read_text())
    original = load_file(ckpt)
    assert set(index["weight_map"]) == set(original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    assert index["metadata"]["n2n.arch"] == model.arch.to_yaml()
    merged = {}
    for name in names:
        shard = load_file(str(dest / name))  # every shard loads with the safetensors library
        assert file_metadata(dest / name) == {"format": "pt"}
        assert all(index["weight_map"][k] == name for k in shard)
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= limit or len(shard) == 1  # only a tensor larger than the limit overflows
        merged.update(shard)
    assert_same_tensors(merged, original)


def test_plan_keeps_natural_order_and_isolates_large_tensors():
    t = {f"layer.{i}.w": torch.zeros(10) for i in (10, 2, 1)}  # 40 bytes each
    t["big"] = torch.zeros(100)
    assert plan_shards(t, 80) == [["big"], ["layer.1.w", "layer.2.w"], ["layer.10.w"]]
    assert plan_shards({}, 80) == [[]]


def test_sharded_round_trip_through_the_cli(runner, tmp_path):
    ckpt, arch = example_paths("mlp")
    out = tmp_path / "student"
    r = runner.invoke(app, [*WIDEN[:1], ckpt, *WIDEN[1:], "--arch", arch, "--max-shard-size", "2KB", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1
    single = tmp_path / "single.safetensors"
    r = runner.invoke(app, [*WIDEN[:1], ckpt, *WIDEN[1:], "--arch", arch, "-o", str(single)])
    assert r.exit_code == 0, r.stderr
    assert_same_tensors(load_model(str(out)).tensors.to_dict(), load_file(str(single)))
    # the architecture and history travel in the index: the folder needs no --arch
    r = runner.invoke(app, ["verify", str(out), str(single)])
    assert r.exit_code == 0, r.stderr
    assert load_model(str(out)).history[-1]["op"] == "widen"


def test_sharded_output_replaces_an_old_sharded_output(tmp_path):
    ckpt, arch = example_paths("mlp")
    model = load_model(ckpt, arch)
    dest = tmp_path / "out"
    save_model(model, str(dest), max_shard_size=500)
    many = sorted(os.listdir(dest))
    save_model(model, str(dest), max_shard_size="1MB")
    assert sorted(os.listdir(dest)) == ["model-00001-of-00001.safetensors", INDEX_NAME] != many
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folders left behind


@pytest.mark.parametrize(
    "dest, message",
    [
        ("-", "cannot go to standard output"),
        ("x.safetensors", "the output is a folder"),
        ("holds-other", "holds other files"),
        ("a-file", "is not a folder"),
        ("missing/out", "does not exist"),
    ],
)
def test_sharded_output_refusals(runner, tmp_path, dest, message):
    ckpt, arch = example_paths("mlp")
    (tmp_path / "holds-other").mkdir()
    (tmp_path / "holds-other" / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("mine")
    before = sorted(os.listdir(tmp_path))
    target = dest if dest == "-" else str(tmp_path / dest)
    r = runner.invoke(app, [*WIDEN[:1], ckpt, *WIDEN[1:], "--arch", arch, "--max-shard-size", "1KB", "-o", target])
    assert r.exit_code == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "holds-other" / "notes.txt").read_text() == "mine"


def test_failed_sharded_write_leaves_nothing(tmp_path):
    def boom():
        raise RuntimeError("disk on fire")

    tensors = {"a": torch.zeros(100), "b": LazyTensor(torch.float32, (100,), boom)}
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_sharded(str(tmp_path / "out"), tensors, {"format": "pt"}, 100)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "text, size",
    [("500MB", 500_000_000), ("2GiB", 2 << 30), ("1.5gb", 1_500_000_000), ("4096", 4096), ("10 KiB", 10240), ("7b", 7)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["abc", "0", "0.1B", "-5MB", "12XB", "", "MB", "1e9"])
def test_bad_max_shard_size_is_a_usage_error(runner, tmp_path, bad):
    ckpt, arch = example_paths("mlp")
    with pytest.raises(N2NError):
        parse_size(bad)
    r = runner.invoke(app, [*WIDEN[:1], ckpt, *WIDEN[1:], "--arch", arch, "--max-shard-size", bad, "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "--max-shard-size" in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- sharded read


def hf_sharded(folder, tensors: dict, groups: list, metadata: dict) -> str:
    """A sharded checkpoint as Hugging Face tools write it, with the safetensors library."""
    folder.mkdir()
    weight_map = {}
    for i, keys in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    index = {"metadata": metadata, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return str(folder / INDEX_NAME)


@pytest.fixture
def hf_cnn(tmp_path):
    ckpt, arch = example_paths("cnn")
    tensors = load_file(ckpt)
    keys = sorted(tensors)
    with open(arch) as f:
        meta = {"total_size": 12345, "total_parameters": 99, "n2n.arch": f.read()}  # numbers are HF bookkeeping
    index = hf_sharded(tmp_path / "hf", tensors, [keys[::2], keys[1::2]], meta)
    return index, tensors


def test_reads_a_hugging_face_sharded_checkpoint_by_index_or_folder(hf_cnn, runner):
    index, tensors = hf_cnn
    for path in (index, os.path.dirname(index), os.path.dirname(index) + "/"):
        model = load_model(path)
        assert_same_tensors(model.tensors.to_dict(), tensors)
        r = runner.invoke(app, ["verify", path, example_paths("cnn")[0], "--arch-b", example_paths("cnn")[1]])
        assert r.exit_code == 0, r.stderr
    ckpt = open_sharded(index)
    assert ckpt.shard_of(sorted(tensors)[1]) == "model-00002-of-00002.safetensors"


def test_widen_from_sharded_to_single_copies_untouched_tensors_exactly(hf_cnn, runner, tmp_path):
    index, tensors = hf_cnn
    out = tmp_path / "wide.safetensors"
    r = runner.invoke(app, ["widen", os.path.dirname(index), "--layer", "conv1", "--width", "12", "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    wide = load_file(str(out))
    untouched = [k for k in tensors if k.startswith("fc")]
    assert untouched and all(torch.equal(wide[k], tensors[k]) for k in untouched)


def test_a_folder_with_a_single_model_file_opens_it(tmp_path):
    ckpt, arch = example_paths("mlp")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(open(ckpt, "rb").read())
    assert_same_tensors(load_model(str(tmp_path / "m"), arch).tensors.to_dict(), load_file(ckpt))


def _corrupt(index_path, fn):
    index = json.loads(open(index_path).read())
    fn(index)
    with open(index_path, "w") as f:
        json.dump(index, f)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda i: i["weight_map"].update({"ghost.weight": "model-00001-of-00002.safetensors"}), "'ghost.weight' in"),
        (lambda i: i["weight_map"].pop(sorted(i["weight_map"])[0]), "does not list it"),
        (lambda i: i["weight_map"].update({k: "model-00009-of-00009.safetensors" for k in list(i["weight_map"])[:1]}), "is missing"),
        (lambda i: i["weight_map"].update({k: "../x.safetensors" for k in list(i["weight_map"])[:1]}), "outside the index's folder"),
        (lambda i: i.pop("weight_map"), "no weight_map"),
        (lambda i: i.update({"metadata": []}), "metadata must be a JSON object"),
    ],
    ids=["tensor-not-in-shard", "unlisted-tensor", "missing-shard", "escaping-path", "no-weight-map", "bad-metadata"],
)
def test_inconsistent_sharded_checkpoints_are_refused(hf_cnn, runner, damage, message):
    index, _ = hf_cnn
    _corrupt(index, damage)
    r = runner.invoke(app, ["inspect", index])
    assert r.exit_code == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_unreadable_index_and_empty_folder(runner, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    for path, message in [(tmp_path / "bad.json", "invalid JSON"), (tmp_path / "empty", "without model.safetensors.index.json"),
                          (tmp_path / "nope.json", "no such file")]:
        r = runner.invoke(app, ["inspect", str(path), "--arch", example_paths("mlp")[1]])
        assert r.exit_code == 2, path
        assert message in r.stderr and str(path) in r.stderr


# -------------------------------------------------------------------------------- progress


class FakeTerminal:
    """Makes progress believe stderr is a terminal, and captures what the bar draws."""

    def __init__(self, monkeypatch):
        from rich.console import Console

        self.buffer = io.StringIO()
        monkeypatch.setattr(progress, "_stderr_is_terminal", lambda: True)
        monkeypatch.setattr(progress, "_console", lambda: Console(file=self.buffer, force_terminal=True, width=100))


def test_progress_shows_only_for_large_work_on_a_terminal(monkeypatch):
    with progress.task("small", progress.THRESHOLD - 1) as bar:
        assert not bar.shown  # stderr is not a terminal under pytest, and the work is small
    with progress.task("large", progress.THRESHOLD) as bar:
        assert not bar.shown  # large, but no terminal
    term = FakeTerminal(monkeypatch)
    with progress.task("small", progress.THRESHOLD - 1) as bar:
        assert not bar.shown
    with progress.task("large work", progress.THRESHOLD) as bar:
        assert bar.shown
        bar.advance(progress.THRESHOLD)
    assert "large work" in term.buffer.getvalue()
    with progress.task("stream", None) as bar:  # unknown size: appears once the work gets large
        bar.advance(progress.THRESHOLD - 1)
        assert not bar.shown
        bar.advance(1)
        assert bar.shown


def test_progress_is_silent_with_quiet(monkeypatch):
    FakeTerminal(monkeypatch)
    progress.set_quiet(True)
    try:
        with progress.task("large", progress.THRESHOLD) as bar:
            assert not bar.shown
    finally:
        progress.set_quiet(False)


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_write_progress_on_a_terminal_and_quiet(runner, monkeypatch, tmp_path, quiet):
    ckpt, arch = example_paths("mlp")
    term = FakeTerminal(monkeypatch)
    monkeypatch.setattr(progress, "THRESHOLD", 1)  # the small example counts as large here
    args = ["--quiet"] if quiet else []
    r = runner.invoke(app, [*args, *WIDEN[:1], ckpt, *WIDEN[1:], "--arch", arch, "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0, r.stderr
    drawn = term.buffer.getvalue()
    if quiet:
        assert drawn == "" and r.stderr == ""
    else:
        assert "writing o.safetensors" in drawn and "verifying" in drawn
        assert "wrote" in r.stderr  # the report itself still goes to stderr
    # --quiet does not stick to the next invocation
    r = runner.invoke(app, ["verify", ckpt, ckpt, "--arch", arch])
    assert r.exit_code == 0 and "equal" in r.stderr


def test_cli_progress_is_silent_when_stderr_is_not_a_terminal(runner, monkeypatch, tmp_path):
    ckpt, arch = example_paths("mlp")
    monkeypatch.setattr(progress, "THRESHOLD", 1)
    r = runner.invoke(app, [*WIDEN[:1], ckpt, *WIDEN[1:], "--arch", arch, "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0
    assert "writing" not in r.stderr and "verifying" not in r.stderr and "\x1b[?25l" not in r.stderr


def test_real_process_with_piped_stderr_prints_no_progress(tmp_path):
    ckpt, arch = example_paths("mlp")
    env = dict(os.environ, COLUMNS="100")
    p = subprocess.run([n2n_exe(), *WIDEN[:1], ckpt, *WIDEN[1:], "--arch", arch, "-o", str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "\x1b[?25l" not in p.stderr  # no cursor games in logs


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@requires_cuda
def test_cuda_verification_streams_parameters_node_by_node():
    """GPU memory holds about one node's parameters at a time, not the model."""
    from n2nsurgery import model_from_state_dict, verify

    width, layers = 1024, 8
    arch = "format: n2n-arch/1\ninputs:\n  x: {shape: [%d], dtype: float32}\nnodes:\n" % width
    prev = "x"
    for i in range(layers):
        arch += f"  - {{name: fc{i}, op: linear, in: {prev}}}\n"
        prev = f"fc{i}"
    arch += f"outputs: [{prev}]\n"
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(layers):
        sd[f"fc{i}.weight"] = torch.randn(width, width, generator=g) / width**0.5
        sd[f"fc{i}.bias"] = torch.zeros(width)
    model = model_from_state_dict(arch, sd)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = verify(model, model, probes=8, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    one_layer = width * width * 4
    assert result.passed and result.device.startswith("cuda")
    assert peak < 3 * one_layer, f"peak {peak} bytes for layers of {one_layer}: parameters were not streamed"


@pytest.mark.cuda
@requires_cuda
def test_cuda_verify_of_a_sharded_checkpoint(runner, hf_cnn):
    index, _ = hf_cnn
    r = runner.invoke(app, ["verify", index, example_paths("cnn")[0], "--arch-b", example_paths("cnn")[1], "--device", "cuda"])
    assert r.exit_code == 0, r.stderr
    assert "cuda" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["deepen", "{ckpt}", "--arch", "{arch}", "--after", "relu1"],
        ["apply", "{ckpt}", "{recipe}", "--arch", "{arch}"],
    ],
    ids=["deepen", "apply"],
)
def test_every_writing_command_takes_max_shard_size(runner, tmp_path, args):
    ckpt, arch = example_paths("mlp")
    recipe = str(tmp_path / "r.yaml")
    with open(recipe, "w") as f:
        f.write("steps:\n  - widen: {layer: fc1, width: 40}\n")
    fill = {"ckpt": ckpt, "arch": arch, "recipe": recipe}
    argv = [a.format(**fill) for a in args]
    r = runner.invoke(app, [*argv, "--max-shard-size", "1KB", "-o", str(tmp_path / "sharded")])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, [*argv, "-o", str(tmp_path / "single.safetensors")])
    assert r.exit_code == 0, r.stderr
    assert len(os.listdir(tmp_path / "sharded")) > 2
    assert_same_tensors(load_model(str(tmp_path / "sharded")).tensors.to_dict(), load_file(str(tmp_path / "single.safetensors")))


def test_only_a_sharded_write_that_replaces_a_folder_is_synced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    tensors = {"a": torch.ones(8), "b": torch.zeros(8)}
    dest = tmp_path / "out"
    write_sharded(str(dest), tensors, {"format": "pt"}, 32)
    assert synced == []
    write_sharded(str(dest), tensors, {"format": "pt"}, 32)
    assert len(synced) == 4  # two shards, the index, the folder
    assert sorted(os.listdir(dest)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX_NAME]
