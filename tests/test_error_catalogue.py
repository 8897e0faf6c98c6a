"""The error catalogue (docs/errors.md, "## Catalogue") is kept true by this test.

Every row of the table names a case (first column, in backticks) that :data:`CASES` below knows
how to trigger; the test runs it and checks the exit code and the start of the message. The
catalogue and :data:`CASES` must name the same cases, so neither can drift from the other.

In the message column, ``FILE``, ``ARCH``, ``OUT`` and ``DIR`` stand for the checkpoint,
architecture, output and output-folder paths given; a message that starts with ``error:`` must
be the start of the one error line; any other text (a usage error, a verification verdict) must
appear on standard error.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import REPO, example_paths
from n2nsurgery.cli import app

ERRORS_DOC = REPO / "docs" / "errors.md"
CNN_CKPT, CNN_ARCH = example_paths("cnn")
MLP_CKPT, MLP_ARCH = example_paths("mlp")


# ------------------------------------------------------------------------------ the cases
#
# Each builder gets a fresh folder and returns (argv, stdin bytes or None, placeholders). The
# teacher is copied into the folder so FILE/ARCH are short, predictable paths.


def _copy(tmp: Path, name: str = "cnn") -> tuple:
    ckpt, arch = example_paths(name)
    c, a = tmp / f"{name}.safetensors", tmp / f"{name}.yaml"
    c.write_bytes(Path(ckpt).read_bytes())
    a.write_bytes(Path(arch).read_bytes())
    return str(c), str(a)


def _places(ckpt=None, arch=None, out=None) -> dict:
    p = {}
    if ckpt:
        p["FILE"] = ckpt
    if arch:
        p["ARCH"] = arch
    if out:
        p["OUT"] = out
        p["DIR"] = os.path.dirname(os.path.abspath(out))
    return p


def _widen(tmp, *args, ckpt=None, arch=None, out=None):
    c, a = _copy(tmp)
    ckpt, arch = ckpt or c, arch or a
    out = out or str(tmp / "out.safetensors")
    return ["widen", ckpt, "--arch", arch, *args, "-o", out], None, _places(ckpt, arch, out)


def _deepen(tmp, *args):
    c, a = _copy(tmp)
    out = str(tmp / "out.safetensors")
    return ["deepen", c, "--arch", a, *args, "-o", out], None, _places(c, a, out)


def _header_edit(tmp, edit) -> str:
    c, _ = _copy(tmp)
    raw = Path(c).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    edit(header)
    blob = json.dumps(header).encode("utf-8", "surrogatepass")
    blob += b" " * (-len(blob) % 8)
    Path(c).write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return c


def _overlap(header):
    key = sorted(k for k in header if k != "__metadata__")[0]
    a, b = header[key]["data_offsets"]
    header[key]["data_offsets"] = [a + 4, b + 4]


def _surrogate(header):
    header["\udc80"] = header.pop(sorted(k for k in header if k != "__metadata__")[0])


def _arch_edit(tmp, old: str, new: str):
    c, a = _copy(tmp)
    text = Path(a).read_text()
    assert old in text
    Path(a).write_text(text.replace(old, new, 1))
    return ["inspect", c, "--arch", a], None, _places(c, a)


def _nonfinite(tmp):
    c, a = _copy(tmp)
    sd = load_file(c)
    sd["conv1.weight"].view(-1)[0] = float("nan")
    save_file(sd, c)
    out = str(tmp / "out.safetensors")
    return ["widen", c, "--arch", a, "--layer", "conv1", "--width", "12", "-o", out], None, _places(c, a, out)


def _truncated(tmp):
    c, a = _copy(tmp)
    Path(c).write_bytes(Path(c).read_bytes()[:-100])
    return ["inspect", c, "--arch", a], None, _places(c, a)


def _not_safetensors(tmp):
    c, a = _copy(tmp)
    Path(c).write_bytes(b"hello")
    return ["inspect", c, "--arch", a], None, _places(c, a)


def _verify_differ(tmp):
    c, a = _copy(tmp)
    sd = load_file(c)
    sd["fc.bias"] += 1.0
    other = str(tmp / "other.safetensors")
    save_file(sd, other)
    return ["verify", c, other, "--arch", a], None, _places(c, a)


def _recipe(tmp, text: str):
    c, a = _copy(tmp)
    r = tmp / "recipe.yaml"
    r.write_text(text)
    out = str(tmp / "out.safetensors")
    return ["apply", c, str(r), "--arch", a, "-o", out], None, {**_places(c, a, out), "RECIPE": str(r)}


def _yaml_alias(tmp):
    """An architecture that reuses a value through an anchor and an alias (the seed of an alias bomb)."""
    c, a = _copy(tmp)
    text = Path(a).read_text()
    text = text.replace("{name: relu1, op: relu, in: bn1}", "{name: relu1, op: relu, in: &b bn1}", 1)
    Path(a).write_text(text.replace("{name: relu2, op: relu, in: bn2}", "{name: relu2, op: relu, in: *b}", 1))
    return ["inspect", c, "--arch", a], None, _places(c, a)


def _pytorch_pickle(tmp):
    import torch

    _, a = _copy(tmp)
    pt = str(tmp / "model.pt")
    torch.save(load_file(CNN_CKPT), pt)
    return ["inspect", pt, "--arch", a], None, _places(pt, a)


def _folder_of_other_files(tmp):
    """A sharded output into a folder that holds a file n2n did not write."""
    folder = tmp / "student"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    return _widen(tmp, "--layer", "conv1", "--width", "12", "--max-shard-size", "1KB", out=str(folder))


def _nonfinite_outputs(tmp, name: str) -> str:
    """The teacher with finite parameters whose outputs are NaN (a batchnorm variance of -1)."""
    c, _ = _copy(tmp)
    sd = load_file(c)
    sd["bn2.running_var"][:] = -1.0
    path = str(tmp / name)
    save_file(sd, path)
    return path


def _teacher_not_finite(tmp):
    c = _nonfinite_outputs(tmp, "nan.safetensors")
    return _widen(tmp, "--layer", "conv1", "--width", "12", ckpt=c)


def _verify_not_finite(tmp):
    _, a = _copy(tmp)
    c = _nonfinite_outputs(tmp, "nan.safetensors")
    return ["verify", c, c, "--arch", a], None, _places(c, a)


CASES = {
    # reading the model
    "missing-checkpoint": lambda t: (["inspect", str(t / "nope.safetensors"), "--arch", CNN_ARCH], None, _places(str(t / "nope.safetensors"))),
    "not-safetensors": _not_safetensors,
    "truncated-checkpoint": _truncated,
    "corrupt-header": lambda t: (["inspect", _header_edit(t, _overlap), "--arch", CNN_ARCH], None, _places(str(t / "cnn.safetensors"))),
    "name-not-unicode": lambda t: (["inspect", _header_edit(t, _surrogate), "--arch", CNN_ARCH], None, _places(str(t / "cnn.safetensors"))),
    "empty-stdin": lambda t: (["inspect", "-", "--arch", CNN_ARCH], b"", {}),
    "no-architecture": lambda t: (["inspect", _copy(t)[0]], None, _places(str(t / "cnn.safetensors"))),
    "malformed-yaml": lambda t: _arch_edit(t, "nodes:", "nodes: [\n"),
    "unknown-op": lambda t: _arch_edit(t, "op: relu, in: bn1", "op: rleu, in: bn1"),
    "missing-input": lambda t: _arch_edit(t, "op: relu, in: bn1", "op: relu, in: bn9"),
    "wrong-attribute": lambda t: _arch_edit(t, "kernel_size: 2", "kernel_size: two"),
    "missing-parameter": lambda t: _arch_edit(t, "{name: fc, op: linear, in: flat}", "{name: fc, op: linear, in: flat, params: {weight: head.w}}"),
    "shape-mismatch": lambda t: _arch_edit(t, "kernel_size: 2", "kernel_size: 1"),
    "nonfinite-parameter": _nonfinite,
    "yaml-alias": _yaml_alias,
    "pytorch-pickle": _pytorch_pickle,
    # what was asked
    "unknown-layer": lambda t: _widen(t, "--layer", "conv9", "--width", "12"),
    "not-a-layer": lambda t: _widen(t, "--layer", "relu1", "--width", "12"),
    "width-not-larger": lambda t: _widen(t, "--layer", "conv1", "--width", "8"),
    "widen-reaches-output": lambda t: _widen(t, "--layer", "fc", "--width", "12"),
    "width-too-large": lambda t: _widen(t, "--layer", "conv1", "--width", str(10**12)),
    "deepen-not-exact": lambda t: _deepen(t, "--after", "conv1", "--activation", "relu"),
    "deepen-even-kernel": lambda t: _deepen(t, "--after", "relu1", "--kernel-size", "4"),
    "deepen-name-taken": lambda t: _deepen(t, "--after", "relu1", "--name", "fc"),
    "recipe-unknown-key": lambda t: _recipe(t, "steps:\n  - widen: {layer: conv1, widht: 12}\n"),
    "too-many-probes": lambda t: (["verify", CNN_CKPT, CNN_CKPT, "--arch", CNN_ARCH, "--probes", str(10**12)], None, {}),
    "missing-option": lambda t: (["widen", CNN_CKPT, "--arch", CNN_ARCH, "--width", "12", "-o", str(t / "o.safetensors")], None, {}),
    "unknown-option": lambda t: _widen(t, "--lyaer", "conv1", "--width", "12"),
    "seed-out-of-range": lambda t: _widen(t, "--layer", "conv1", "--width", "12", "--seed", str(2**63)),
    "teacher-not-finite": _teacher_not_finite,
    # where it goes
    "output-is-input": lambda t: _widen(t, "--layer", "conv1", "--width", "12", out=str(t / "cnn.safetensors")),
    "output-folder-missing": lambda t: _widen(t, "--layer", "conv1", "--width", "12", out=str(t / "no" / "out.safetensors")),
    "output-is-a-folder": lambda t: _widen(t, "--layer", "conv1", "--width", "12", out=str(t)),
    "output-folder-not-ours": _folder_of_other_files,
    "output-missing": lambda t: (_widen(t, "--layer", "conv1", "--width", "12")[0][:-2], None, {}),
    "json-and-stdout": lambda t: (_widen(t, "--layer", "conv1", "--width", "12", "--json", out="-")[0], None, {}),
    # verification
    "verify-differ": _verify_differ,
    "verify-not-finite": _verify_not_finite,
    "noise-beyond-tolerance": lambda t: _widen(t, "--layer", "conv1", "--width", "12", "--noise", "0.5", "--atol", "0", "--rtol", "0"),
}


# ------------------------------------------------------------------------- the catalogue table


def catalogue() -> list:
    """(case, situation, message, exit code) for every row of the "## Catalogue" table of docs/errors.md."""
    text = ERRORS_DOC.read_text()
    m = re.search(r"^## Catalogue\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "docs/errors.md has no '## Catalogue' section"
    rows = []
    for line in m.group(1).splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, f"a catalogue row needs 4 cells: {line}"
        case, situation, message, code = cells
        quoted = re.match(r"`([^`]*)`", message)  # the message is the first code span (notes may follow)
        assert quoted, f"the message of {case} is not in backticks: {line}"
        rows.append((case.strip("`"), situation, quoted.group(1), int(code)))
    return rows


ROWS = catalogue()


def test_catalogue_and_cases_name_the_same_cases():
    documented = [r[0] for r in ROWS]
    assert len(documented) == len(set(documented)), "a case is documented twice"
    assert set(documented) == set(CASES), (
        f"in docs/errors.md but not here: {sorted(set(documented) - set(CASES))}; "
        f"here but not in docs/errors.md: {sorted(set(CASES) - set(documented))}"
    )


@pytest.mark.parametrize("case,situation,message,code", ROWS, ids=[r[0] for r in ROWS])
def test_documented_case_behaves_as_documented(runner, tmp_path, case, situation, message, code):
    argv, stdin, places = CASES[case](tmp_path)
    before = set(os.listdir(tmp_path))
    result = runner.invoke(app, argv, input=stdin)
    assert result.exit_code == code, f"{case}: exit {result.exit_code}, documented {code}\n{result.output}"
    assert "Traceback" not in result.output
    want = message
    for name, value in sorted(places.items(), key=lambda kv: -len(kv[0])):
        want = want.replace(name, value)
    if want.startswith("error: "):
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1, f"{case}: expected one error line\n{result.stderr}"
        assert lines[0].startswith(want), f"{case}: documented {want!r}\n          got        {lines[0]!r}"
    else:
        flat = " ".join(result.stderr.split())
        assert " ".join(want.split()) in flat, f"{case}: {want!r} not on stderr:\n{result.stderr}"
    if code != 0:  # a failed command writes nothing
        assert set(os.listdir(tmp_path)) == before, f"{case} left {set(os.listdir(tmp_path)) - before}"


def test_placeholders_are_the_only_variable_parts():
    """Messages mention the documented placeholders, not paths of the machine that wrote them."""
    for case, _, message, _ in ROWS:
        assert "/tmp" not in message and "/work" not in message, case
