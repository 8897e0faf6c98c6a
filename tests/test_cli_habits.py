"""The habits users expect of a command line (issue 12).

Fast start-up (no torch for help, version and usage errors), one-line usage errors, global flags
anywhere, Ctrl-C as one line, NO_COLOR, names with control characters shown escaped, bounded
seeds, exit codes that survive a closed stderr, and an inspect table that fits 80 columns.
Real processes where the behaviour lives outside the app (start-up, file descriptors, the
terminal); ``CliRunner`` elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import EXAMPLE_NAMES, example_paths, n2n_exe
from n2nsurgery.cli import app, common

MLP_CKPT, MLP_ARCH = example_paths("mlp")
COMMANDS = ("inspect", "widen", "deepen", "apply", "verify", "diff")
ESCAPES = ("\x1b", "\x07")


def run_python(code: str, *args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, **kw)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# ------------------------------------------------------------------------------- start-up

_HEAVY = """
import sys
from n2nsurgery.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "numpy", "safetensors") if m in sys.modules]
print("HEAVY", heavy, "CODE", code)
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["-V"], ["widen", "--nope"], ["frob"], ["verify", "a"],
     ["widen", "x", "--layer", "a", "--width", "many", "-o", "o"]] + [[cmd, "--help"] for cmd in COMMANDS],
    ids=lambda a: " ".join(a),
)
def test_help_version_and_usage_errors_do_not_import_torch(argv):
    r = run_python(_HEAVY, *argv)
    assert "HEAVY [] CODE" in r.stdout, (r.stdout, r.stderr)


def test_api_names_still_importable_without_importing_torch_first():
    r = run_python(
        "import sys, n2nsurgery as n2n\n"
        "assert 'torch' not in sys.modules\n"
        "import n2nsurgery.verify\n"  # the submodule must not replace the function
        "from n2nsurgery import load_model, verify, Model, N2NError\n"
        "from n2nsurgery import widen\n"  # a submodule, as before
        f"m = n2n.load_model({MLP_CKPT!r}, {MLP_ARCH!r})\n"
        "assert callable(n2n.verify) and n2n.verify(m, m, probes=2, device='cpu').passed\n"
        "assert callable(widen.widen) and isinstance(m, Model)\n"
        "print('OK')\n"
    )
    assert r.stdout.strip() == "OK", r.stderr


_INTERRUPT_AT = """
import sys

TARGET = sys.argv[1]


class Interrupt:  # Ctrl-C arriving while TARGET is being imported
    def find_spec(self, name, path=None, target=None):
        if name == TARGET:
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
sys.argv = ["n2n", *sys.argv[2:]]
from n2nsurgery.cli import main
main()
"""


@pytest.mark.parametrize(
    "module, argv",
    [("typer", ["--help"]), ("n2nsurgery.cli.deepen_cmd", ["--help"]), ("torch", ["inspect", MLP_CKPT, "--arch", MLP_ARCH])],
)
def test_ctrl_c_during_start_up_is_one_line(module, argv):
    r = run_python(_INTERRUPT_AT, module, *argv)
    assert r.returncode == 130, r.stderr
    assert r.stderr == "interrupted; nothing was written\n"


def test_ctrl_c_while_options_are_parsed_is_one_line(runner, monkeypatch):
    from typer.core import TyperCommand

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TyperCommand, "parse_args", interrupted)
    result = runner.invoke(app, ["inspect", MLP_CKPT])
    assert result.exit_code == 130
    assert result.stderr == "interrupted; nothing was written\n"


# ------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["widen", MLP_CKPT, "--nope"], "No such option: --nope"),
        (["widen"], "Missing argument 'CKPT'"),
        (["widen", MLP_CKPT, "--width", "4", "-o", "x"], "Missing option '--layer'"),
        (["widen", MLP_CKPT, "--layer", "fc1", "--width", "many", "-o", "x"], "'--width'"),
        (["deepen", MLP_CKPT, "--after", "fc1", "--op", "magic", "-o", "x"], "'--op'"),
        (["frob"], "No such command 'frob'"),
        (["--frob"], "No such option: --frob"),
        (["verify", MLP_CKPT, MLP_CKPT, "--seed", str(2**64)], "'--seed'"),
        (["verify", MLP_CKPT, MLP_CKPT, "--seed", "-1"], "'--seed'"),
    ],
)
def test_usage_errors_are_one_line(runner, argv, fragment):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert fragment in line and "--help" in line
    assert "╭" not in result.stderr and result.stdout == ""


def test_usage_error_from_the_console_script(tmp_path):
    r = subprocess.run([n2n_exe(), "widen", MLP_CKPT, "--nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert one_error_line(r.stderr) == "error: No such option: --nope (Possible options: --noise); see 'n2n widen --help'"


def test_short_version_flag(runner):
    for flag in ("-V", "--version"):
        result = runner.invoke(app, [flag])
        assert result.exit_code == 0 and re.fullmatch(r"n2n \S+\n", result.stdout)


# ----------------------------------------------------------------- global flags anywhere


@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_quiet_after_the_command(runner, flag):
    result = runner.invoke(app, ["inspect", MLP_CKPT, "--arch", MLP_ARCH, flag])
    assert result.exit_code == 0 and result.stderr == ""
    loud = runner.invoke(app, ["inspect", MLP_CKPT, "--arch", MLP_ARCH])  # not sticky
    assert "fc1" in loud.stderr


def test_debug_after_the_command(runner, tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.safetensors"), "--arch", MLP_ARCH, "--debug"])
    assert result.exit_code == 2 and "Traceback" in result.stderr
    plain = runner.invoke(app, ["inspect", str(tmp_path / "nope.safetensors"), "--arch", MLP_ARCH])
    assert "Traceback" not in plain.stderr


def test_global_flags_are_in_every_commands_help(runner):
    for cmd in COMMANDS:
        text = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"}).stdout
        assert "--quiet" in text and "--debug" in text, cmd


# ------------------------------------------------------------------------------ NO_COLOR


def test_no_color_means_no_escape_sequences_even_on_a_terminal():
    exe = n2n_exe()
    forced = {"FORCE_COLOR": "1", "TERM": "xterm", "COLUMNS": "200"}
    colored = subprocess.run([exe, "inspect", MLP_CKPT, "--arch", MLP_ARCH], capture_output=True, text=True,
                             timeout=120, env={**os.environ, **forced})
    assert "\x1b[" in colored.stderr  # the forced terminal does get styles: the check below can fail
    plain_env = {**os.environ, **forced, "NO_COLOR": "1"}
    for argv in (["inspect", MLP_CKPT, "--arch", MLP_ARCH], ["--help"], ["widen", "--help"], ["widen", "--nope"]):
        r = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=120, env=plain_env)
        assert "\x1b" not in r.stdout + r.stderr, argv


# ------------------------------------------------------------------ inspect at 80 columns


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_inspect_at_80_columns_splits_no_name_or_op(runner, monkeypatch, name):
    ckpt, arch = example_paths(name)
    info = json.loads(runner.invoke(app, ["inspect", ckpt, "--arch", arch, "--json"]).stdout)
    monkeypatch.setattr(common.console, "width", 80)
    text = runner.invoke(app, ["inspect", ckpt, "--arch", arch]).stderr
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    rows = [(n["name"], n["op"]) for n in info["nodes"]] + [(k, "input") for k in info["inputs"]]
    for node, op in rows:  # each row starts with its whole name, then its whole op
        assert any(re.match(rf"{re.escape(node)} +{op}( |$)", ln) for ln in lines), (node, op, text)


# ------------------------------------------------------------ names with control characters

EVIL = "\x1b]0;x\x07"


def test_control_characters_in_paths_and_keys_are_escaped(runner, tmp_path):
    tensors = load_file(MLP_CKPT)
    tensors[f"fc1{EVIL}.weight"] = torch.zeros(2)
    ckpt = tmp_path / f"m{EVIL}.safetensors"
    save_file(tensors, str(ckpt))
    out = tmp_path / f"o{EVIL}.safetensors"
    runs = [
        ["inspect", ckpt, "--arch", MLP_ARCH],
        ["diff", MLP_CKPT, ckpt, "--arch", MLP_ARCH],
        ["widen", ckpt, "--arch", MLP_ARCH, "--layer", "fc1", "--width", "40", "-o", out],
        ["deepen", ckpt, "--arch", MLP_ARCH, "--after", "relu1", "-o", out, "--overwrite-input"],
        ["deepen", ckpt, "--arch", MLP_ARCH, "--after", f"relu{EVIL}", "-o", out],  # refused: names it
        ["widen", ckpt, "--arch", MLP_ARCH, "--layer", f"fc{EVIL}", "--width", "40", "-o", out],
        ["inspect", tmp_path / f"missing{EVIL}.safetensors", "--arch", MLP_ARCH],
        ["widen", ckpt, f"--bad{EVIL}"],  # a usage error quotes argv too
    ]
    for argv in runs:
        result = runner.invoke(app, [str(a) for a in argv])
        assert result.exit_code in (0, 2), (argv, result.output)
        assert not any(c in result.stderr for c in ESCAPES), (argv, result.stderr)
        assert "\\x1b]0;x\\x07" in result.stderr, (argv, result.stderr)  # shown, escaped


def test_printable():
    from n2nsurgery.errors import printable

    assert printable("a\x00b\x1bc\x7fd\x9be\tf") == "a\\x00b\\x1bc\\x7fd\\x9be\\x09f"
    assert printable("caf\udce9") == "caf\\xe9"  # an undecodable byte, as the byte
    assert printable("résumé · 模型") == "résumé · 模型"


@pytest.mark.parametrize("name", ["bad\udcff", f"x{EVIL}", "tab\there"])
def test_new_node_name_must_be_printable(runner, tmp_path, name):
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["deepen", MLP_CKPT, "--arch", MLP_ARCH, "--after", "relu1", "--name", name, "-o", str(out)])
    assert result.exit_code == 2
    assert one_error_line(result.stderr).startswith("error: --name '")
    assert not out.exists()


def test_undecodable_new_node_name_from_a_real_process(tmp_path):
    out = tmp_path / "out.safetensors"
    r = subprocess.run([n2n_exe(), "deepen", MLP_CKPT, "--arch", MLP_ARCH, "--after", "relu1", "--name", b"bad\xff",
                        "-o", str(out)], capture_output=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(b"error: --name 'bad\\xff'") and b"Traceback" not in r.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------ seeds


@pytest.mark.parametrize("seed", [2**50, 2**63 - 1])
def test_large_seeds_with_noise(runner, tmp_path, seed):
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["widen", MLP_CKPT, "--arch", MLP_ARCH, "--layer", "fc1", "--width", "40",
                                 "--seed", str(seed), "--noise", "0.1", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["seed"] == seed


@pytest.mark.parametrize("cmd", ["widen", "deepen", "verify", "apply"])
@pytest.mark.parametrize("seed", [2**63, 2**64, -1])
def test_seed_out_of_range_is_a_usage_error(runner, tmp_path, cmd, seed):
    rest = {
        "widen": [MLP_CKPT, "--layer", "fc1", "--width", "40", "-o", "o"],
        "deepen": [MLP_CKPT, "--after", "relu1", "-o", "o"],
        "verify": [MLP_CKPT, MLP_CKPT],
        "apply": [MLP_CKPT, "r.yaml", "-o", "o"],
    }[cmd]
    result = runner.invoke(app, [cmd, *rest, "--seed", str(seed)])
    assert result.exit_code == 2
    assert "'--seed'" in one_error_line(result.stderr)


@pytest.mark.parametrize("where", ["top", "step"])
def test_recipe_seed_out_of_range(runner, tmp_path, where):
    step = "{layer: fc1, width: 40, seed: 18446744073709551616}" if where == "step" else "{layer: fc1, width: 40}"
    top = "seed: 9223372036854775808\n" if where == "top" else ""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{top}steps:\n  - widen: {step}\n")
    result = runner.invoke(app, ["apply", MLP_CKPT, str(recipe), "--arch", MLP_ARCH, "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2
    assert "2**63" in one_error_line(result.stderr)


# ------------------------------------------------------------------------ a closed stderr


def _with_stderr(argv, how: str, tmp_path) -> int:
    """Exit code of `n2n argv` with stderr closed (2>&-) or full (2>/dev/full)."""
    if how == "closed":
        return subprocess.run([n2n_exe(), *argv], stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(2),
                              timeout=120).returncode
    with open("/dev/full", "w") as full:
        return subprocess.run([n2n_exe(), *argv], stdout=subprocess.DEVNULL, stderr=full, timeout=120).returncode


@pytest.mark.parametrize("how", ["closed", "full"])
def test_exit_codes_survive_a_lost_stderr(tmp_path, how):
    if how == "full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    out = tmp_path / "out.safetensors"
    widen = ["widen", MLP_CKPT, "--arch", MLP_ARCH, "--width", "40", "-o", str(out)]
    assert _with_stderr([*widen, "--layer", "nope"], how, tmp_path) == 2  # refused
    assert not out.exists()
    assert _with_stderr(["widen", MLP_CKPT, "--nope"], how, tmp_path) == 2  # usage error
    assert _with_stderr([*widen, "--layer", "fc1"], how, tmp_path) == 0  # the report is lost, not the run
    assert load_file(str(out))["fc1.weight"].shape == (40, 16)


def test_gitignore_covers_root_outputs_but_not_shipped_recipes():
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    check = subprocess.run(["git", "check-ignore", "--no-index", "x.safetensors", "recipes/cnn.safetensors"],
                           cwd=repo, capture_output=True, text=True)
    assert check.stdout.split() == ["x.safetensors"]
