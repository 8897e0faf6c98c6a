#!/usr/bin/env python
"""Scale benchmark: surgery at disk speed, memory bounded by the largest tensor (not a test).

Builds, in a temporary folder:

* ``dense.safetensors``: 16 linear layers of 4096x4096 float32 with biases (1 GiB), ReLUs
  between them, and its architecture ``dense.yaml``;
* ``dense4.safetensors``: the same with 64 layers (4 GiB);
* ``dense-bf16/``: 128 such layers in bfloat16 (4 GiB), sharded Hugging Face style.

and reports, in one run:

* the median time of ``n2n widen --no-verify`` (one layer 4096 -> 8192 units) against the median
  time of ``cp`` of the same file, and their ratio (target: <= 1.5); the start-up time of a
  command that reads a checkpoint (the same widen of the few-KB ``recipes/mlp`` example:
  Python, torch, the CLI) and the ratio without it, beside ``n2n --version`` (no torch); the same widen
  over an existing output (which n2n syncs to disk before replacing it) against ``cp`` + ``sync``;
* what each further GiB costs: the slope of widen's time between the 1 GiB and 4 GiB float32
  checkpoints, against the slope of ``cp``'s;
* at both sizes, ``floor_widen.py``: the least work a Python widening can do (numpy only, no
  torch, no checks beyond NaN/Inf), as a second baseline;
* every run's peak RSS against the checkpoint size and the largest tensor
  (target: <= 2 x largest tensor + 300 MiB);
* ``n2n verify`` throughput (checkpoint bytes of both models per second) and its peak RSS;
* the widening of the 4 GiB sharded checkpoint, written sharded, against the same memory bound.

Run it from the repository root (about 13 GiB of free disk in --tmp; several minutes)::

    .venv/bin/python benchmarks/bench_scale.py            # the full run
    .venv/bin/python benchmarks/bench_scale.py --quick    # small sizes: a smoke test

Why the odd process layout: peak RSS is read per child with ``os.wait4``. Linux charges a child
started with vfork (what ``subprocess`` uses) with its parent's peak RSS, so this parent never
imports torch nor holds tensors: checkpoints are built by a child (``--make``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
GiB = 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def n2n_exe() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "n2n")
    if not os.path.exists(path):
        sys.exit("the n2n console script is not next to this Python; run with the project's venv (.venv/bin/python)")
    return path


# ------------------------------------------------------------------------- building (child)


def arch_yaml(layers: int, width: int, dtype: str) -> str:
    lines = ["format: n2n-arch/1", f"name: dense-{layers}x{width}", "inputs:", f"  x: {{shape: [{width}], dtype: float32}}", "nodes:"]
    prev = "x"
    for i in range(layers):
        lines.append(f"  - {{name: fc{i}, op: linear, in: {prev}}}")
        prev = f"fc{i}"
        if i < layers - 1:
            lines.append(f"  - {{name: relu{i}, op: relu, in: {prev}}}")
            prev = f"relu{i}"
    lines.append(f"outputs: [{prev}]")
    return "\n".join(lines) + "\n"


def make(kind: str, dest: str, layers: int, width: int, shard: str | None) -> None:
    """Write a dense checkpoint tensor by tensor (the builder's memory stays at one layer)."""
    import torch

    from n2nsurgery.checkpoint import LazyTensor, write_checkpoint
    from n2nsurgery.shards import write_sharded

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[kind]

    def weight(i):
        g = torch.Generator().manual_seed(i)
        return (torch.randn(width, width, generator=g) * width**-0.5).to(dtype)

    def bias(i):
        g = torch.Generator().manual_seed(10_000 + i)
        return (torch.randn(width, generator=g) * 0.01).to(dtype)

    tensors = {}
    for i in range(layers):
        tensors[f"fc{i}.weight"] = LazyTensor(dtype, (width, width), lambda i=i: weight(i))
        tensors[f"fc{i}.bias"] = LazyTensor(dtype, (width,), lambda i=i: bias(i))
    if shard:
        write_sharded(dest, tensors, {"format": "pt"}, shard)
    else:
        write_checkpoint(dest, tensors, {"format": "pt"})
    yaml_path = (dest[: -len(".safetensors")] if dest.endswith(".safetensors") else dest.rstrip("/")) + ".yaml"
    with open(yaml_path, "w") as f:
        f.write(arch_yaml(layers, width, kind))


def phases(ckpt: str, arch: str, layer: str, width: int, out: str) -> None:
    """Time the stages of `n2n widen --no-verify` in one process; print them as JSON."""
    t0 = time.perf_counter()
    import n2nsurgery.cli  # noqa: F401  (what the command imports: torch, typer, rich, ...)
    from n2nsurgery import load_model, save_model
    from n2nsurgery.widen import widen

    t1 = time.perf_counter()
    teacher = load_model(ckpt, arch)
    student, _ = widen(teacher, layer, width)
    t2 = time.perf_counter()
    try:
        from n2nsurgery.guards import check_finite
    except ImportError:  # older trees have no finiteness guard
        check_finite = None
    if check_finite is not None:
        check_finite(teacher)
    t3 = time.perf_counter()
    save_model(student, out)
    t4 = time.perf_counter()
    print(json.dumps({"import": t1 - t0, "load_plan": t2 - t1, "finite_scan": t3 - t2, "write": t4 - t3}))


# ---------------------------------------------------------------------------- measuring


def measured(cmd: list, env=None) -> dict:
    """Run `cmd`; its wall time and peak RSS (of that child alone, via wait4)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err.read().decode(errors='replace')}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024}


def size_of(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    return os.path.getsize(path)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def bound(largest: int) -> int:
    return 2 * largest + 300 * MiB


# -------------------------------------------------------------------------------- the run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs of widen and of cp (median reported)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary checkpoints (default: the system's)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test of this script")
    ap.add_argument("--skip-4g", action="store_true", help="skip the two 4 GiB checkpoints")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--make", nargs=4, metavar=("KIND", "DEST", "LAYERS", "WIDTH"), help=argparse.SUPPRESS)
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phases", nargs=5, metavar=("CKPT", "ARCH", "LAYER", "WIDTH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phases:
        ckpt, arch, layer, width, out = args.phases
        phases(ckpt, arch, layer, int(width), out)
        return
    if args.make:
        kind, dest, layers, width = args.make
        make(kind, dest, int(layers), int(width), args.shard)
        return

    n2n = n2n_exe()
    width, layers, big_layers = (1024, 16, 32) if args.quick else (4096, 16, 128)
    new_width = 2 * width
    f32_largest_in, f32_largest_out = width * width * 4, new_width * width * 4
    bf16_largest_out = new_width * width * 2
    runs = max(1, args.runs)
    env = dict(os.environ, COLUMNS="120")
    work = tempfile.mkdtemp(prefix="n2n-bench-", dir=args.tmp)
    figures: dict = {"width": width, "layers": layers, "new_width": new_width}
    try:
        dense = os.path.join(work, "dense.safetensors")
        print(f"building {dense} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--make", "f32", dense, str(layers), str(width)], check=True)
        ckpt_size = size_of(dense)
        arch = os.path.join(work, "dense.yaml")
        out = os.path.join(work, "wide.safetensors")
        copy = os.path.join(work, "copy.safetensors")
        widen_cmd = [n2n, "--quiet", "widen", dense, "--arch", arch, "--layer", f"fc{layers // 2}",
                     "--width", str(new_width), "--no-verify", "-o", out]

        # Warm the page cache and the interpreter's bytecode cache; neither run is timed.
        measured(["cp", dense, copy]), remove(copy)
        measured(widen_cmd)
        floor_cmd = [sys.executable, os.path.join(HERE, "floor_widen.py"), dense, str(layers // 2), str(new_width), out]
        cp_runs, widen_runs, cp_sync_runs, replace_runs, floor_runs = [], [], [], [], []
        for _ in range(runs):  # interleaved, so drift in machine load hits all alike
            remove(copy)
            cp_runs.append(measured(["cp", dense, copy]))
            remove(out)
            floor_runs.append(measured(floor_cmd))
            remove(copy)
            # like for like with a widen that replaces an existing output, which n2n syncs
            cp_sync_runs.append(measured(["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", dense, copy]))
            remove(out)
            widen_runs.append(measured(widen_cmd))  # a new output, not synced (as cp)
            replace_runs.append(measured(widen_cmd))  # over the previous one: synced first
        remove(copy)
        # Start-up is what a command that reads a checkpoint pays before its work: Python, torch
        # and the CLI. `n2n --version` no longer imports torch, so it would under-count; the same
        # widen of the few-KB shipped mlp example pays the same imports and does next to no work.
        tiny_out = os.path.join(work, "tiny-wide.safetensors")
        tiny_cmd = [n2n, "--quiet", "widen", os.path.join(REPO, "recipes", "mlp.safetensors"),
                    "--arch", os.path.join(REPO, "recipes", "mlp.yaml"), "--layer", "fc1", "--width", "64",
                    "--no-verify", "-o", tiny_out]
        startup = [measured(tiny_cmd)["seconds"] for _ in range(runs)]
        version = [measured([n2n, "--version"])["seconds"] for _ in range(runs)]
        remove(tiny_out)
        stages = []
        for _ in range(3):  # where the time of one widen goes, measured inside the process
            remove(out)
            p = subprocess.run([sys.executable, __file__, "--phases", dense, arch, f"fc{layers // 2}", str(new_width), out],
                               check=True, capture_output=True, text=True)
            stages.append(json.loads(p.stdout))
        stage_median = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
        cp_med = statistics.median(r["seconds"] for r in cp_runs)
        widen_med = statistics.median(r["seconds"] for r in widen_runs)
        figures["f32"] = {
            "checkpoint_bytes": ckpt_size,
            "output_bytes": size_of(out),
            "largest_tensor_in": f32_largest_in,
            "largest_tensor_out": f32_largest_out,
            "cp_seconds": [r["seconds"] for r in cp_runs],
            "widen_seconds": [r["seconds"] for r in widen_runs],
            "widen_peak_rss": [r["peak_rss"] for r in widen_runs],
            "cp_median": cp_med,
            "cp_fsync_median": statistics.median(r["seconds"] for r in cp_sync_runs),
            "widen_median": widen_med,
            "ratio": widen_med / cp_med,
            "widen_replacing_median": statistics.median(r["seconds"] for r in replace_runs),
            "floor_median": statistics.median(r["seconds"] for r in floor_runs),
            "startup_median": statistics.median(startup),
            "version_median": statistics.median(version),
            "stages_median": stage_median,
            "rss_bound": bound(f32_largest_out),
        }

        verify_cmd = [n2n, "--quiet", "verify", dense, out, "--arch-a", arch, "--device", "cpu"]
        v = [measured(verify_cmd) for _ in range(max(1, runs // 2))]
        v_med = statistics.median(r["seconds"] for r in v)
        figures["verify"] = {
            "seconds": [r["seconds"] for r in v],
            "peak_rss": [r["peak_rss"] for r in v],
            "bytes_per_second": (ckpt_size + size_of(out)) / v_med,
        }
        remove(out)
        remove(dense)

        if not args.skip_4g:
            # The same network, 4x as many layers: what each further GiB costs, once the fixed
            # start-up cost is paid (the slope between the two sizes, for widen and for cp).
            big32 = os.path.join(work, "dense4.safetensors")
            print(f"building {big32} ({4 * layers} float32 layers) ...", flush=True)
            subprocess.run([sys.executable, __file__, "--make", "f32", big32, str(4 * layers), str(width)], check=True)
            big32_cmd = [n2n, "--quiet", "widen", big32, "--arch", os.path.join(work, "dense4.yaml"), "--layer",
                         f"fc{layers // 2}", "--width", str(new_width), "--no-verify", "-o", out]
            measured(["cp", big32, copy]), remove(copy)  # warm the page cache
            c4, w4, f4 = [], [], []
            for _ in range(max(1, runs // 2 + 1)):
                remove(copy)
                c4.append(measured(["cp", big32, copy]))
                remove(out)
                f4.append(measured([sys.executable, os.path.join(HERE, "floor_widen.py"), big32, str(layers // 2), str(new_width), out]))
                remove(out)
                w4.append(measured(big32_cmd))
            c4_med = statistics.median(r["seconds"] for r in c4)
            w4_med = statistics.median(r["seconds"] for r in w4)
            figures["f32_4x"] = {
                "checkpoint_bytes": size_of(big32),
                "cp_median": c4_med,
                "widen_median": w4_med,
                "widen_peak_rss": [r["peak_rss"] for r in w4],
                "rss_bound": bound(f32_largest_out),
                "floor_median": statistics.median(r["seconds"] for r in f4),
                "marginal_ratio": (w4_med - widen_med) / (c4_med - cp_med),
            }
            remove(copy), remove(out), remove(big32)

            big = os.path.join(work, "dense-bf16")
            print(f"building {big}/ ({big_layers} bfloat16 layers, sharded) ...", flush=True)
            subprocess.run([sys.executable, __file__, "--make", "bf16", big, str(big_layers), str(width), "--shard", "1GiB"], check=True)
            big_out = os.path.join(work, "wide-bf16")
            big_copy = os.path.join(work, "copy-bf16")
            measured(["cp", "-r", big, big_copy])  # warms the page cache
            remove(big_copy)
            c = measured(["cp", "-r", big, big_copy])
            remove(big_copy)
            w = measured([n2n, "--quiet", "widen", big, "--arch", big + ".yaml", "--layer", f"fc{big_layers // 2}",
                          "--width", str(new_width), "--no-verify", "--max-shard-size", "1GiB", "-o", big_out])
            figures["bf16_sharded"] = {
                "checkpoint_bytes": size_of(big),
                "shards": len([n for n in os.listdir(big) if n.endswith(".safetensors")]),
                "output_bytes": size_of(big_out),
                "largest_tensor_out": bf16_largest_out,
                "cp_seconds": c["seconds"],
                "widen_seconds": w["seconds"],
                "widen_peak_rss": w["peak_rss"],
                "rss_bound": bound(bf16_largest_out),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def report(fig: dict) -> None:
    f = fig["f32"]
    ok = lambda cond: "meets target" if cond else "MISSES target"  # noqa: E731
    print()
    print(f"float32 checkpoint: {fmt_bytes(f['checkpoint_bytes'])}, {fig['layers']} layers {fig['width']}x{fig['width']}; "
          f"widen fc{fig['layers'] // 2} {fig['width']} -> {fig['new_width']} (output {fmt_bytes(f['output_bytes'])})")
    print(f"  cp      median {f['cp_median']:.2f} s   runs " + " ".join(f"{s:.2f}" for s in f["cp_seconds"]))
    print(f"  widen   median {f['widen_median']:.2f} s   runs " + " ".join(f"{s:.2f}" for s in f["widen_seconds"])
          + f"   (of which start-up, a widen of the tiny mlp example: {f['startup_median']:.2f} s;"
          + f" `n2n --version` alone: {f['version_median']:.2f} s)")
    print(f"  ratio widen / cp = {f['ratio']:.2f} ({ok(f['ratio'] <= 1.5)}: <= 1.5); "
          f"without the start-up {(f['widen_median'] - f['startup_median']) / f['cp_median']:.2f}")
    print(f"  floor   median {f['floor_median']:.2f} s   = {f['floor_median'] / f['cp_median']:.2f} x cp: benchmarks/floor_widen.py, "
          "the least a Python widening can do (numpy only, no checks beyond NaN/Inf, same I/O tricks)")
    print(f"  replacing an existing output (synced first): widen {f['widen_replacing_median']:.2f} s "
          f"against cp + sync {f['cp_fsync_median']:.2f} s (ratio {f['widen_replacing_median'] / f['cp_fsync_median']:.2f})")
    st = f["stages_median"]
    print("  inside one widen: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in st.items())
          + f"; the write alone is {st['write'] / f['cp_median']:.2f} x cp")
    worst = max(f["widen_peak_rss"])
    print(f"  widen peak RSS " + ", ".join(fmt_bytes(r) for r in f["widen_peak_rss"])
          + f"; checkpoint {fmt_bytes(f['checkpoint_bytes'])}, largest tensor {fmt_bytes(f['largest_tensor_in'])} in / "
          f"{fmt_bytes(f['largest_tensor_out'])} out; bound 2 x largest + 300 MiB = {fmt_bytes(f['rss_bound'])} ({ok(worst <= f['rss_bound'])})")
    v = fig["verify"]
    print(f"  verify  {statistics.median(v['seconds']):.2f} s median, {v['bytes_per_second'] / GiB:.2f} GiB/s of checkpoint "
          f"(both models), peak RSS " + ", ".join(fmt_bytes(r) for r in v["peak_rss"]))
    if "f32_4x" in fig:
        g = fig["f32_4x"]
        print(f"float32 checkpoint 4x as deep: {fmt_bytes(g['checkpoint_bytes'])}; cp {g['cp_median']:.2f} s, floor "
              f"{g['floor_median']:.2f} s, widen {g['widen_median']:.2f} s (ratio {g['widen_median'] / g['cp_median']:.2f}), peak RSS {fmt_bytes(max(g['widen_peak_rss']))} ({ok(max(g['widen_peak_rss']) <= g['rss_bound'])})")
        print(f"  each further GiB: widen costs {g['marginal_ratio']:.2f} x what cp costs (the slope between the two sizes)")
    if "bf16_sharded" in fig:
        b = fig["bf16_sharded"]
        print(f"bfloat16 sharded checkpoint: {fmt_bytes(b['checkpoint_bytes'])} in {b['shards']} shards; widen to a sharded output "
              f"({fmt_bytes(b['output_bytes'])})")
        print(f"  cp -r {b['cp_seconds']:.2f} s, widen {b['widen_seconds']:.2f} s (ratio {b['widen_seconds'] / b['cp_seconds']:.2f}); "
              f"peak RSS {fmt_bytes(b['widen_peak_rss'])}, largest tensor {fmt_bytes(b['largest_tensor_out'])}, "
              f"bound {fmt_bytes(b['rss_bound'])} ({ok(b['widen_peak_rss'] <= b['rss_bound'])})")


if __name__ == "__main__":
    main()
