#!/usr/bin/env python
"""Hugging Face folder benchmark (issue 15): block deepening and `n2n grow` on a Llama-shaped
bfloat16 folder of about 1 GiB of random weights (not a test).

The folder is generated here (``config.json`` + ``model.safetensors``, no transformers needed),
then, each as its own process, timed with its peak RSS (``ru_maxrss`` of the child):

* ``cp -r``: the floor for any tool that reads and writes the whole folder;
* ``n2n deepen --block copy --every K``;
* ``mergekit-yaml`` passthrough (layer stacking, the same layers as ``--every K``) when
  ``mergekit-yaml`` is on PATH (the benchmark extra installs it where it installs);
* ``n2n grow --set num_hidden_layers=L`` (the same new layers through the planner).

Targets (issue 15): n2n deepen no slower than mergekit; peak RSS ≤ 2 × the largest tensor +
300 MiB. Results go to ``benchmarks/results/hf_grow.json``. Run from the repository root::

    .venv/bin/python benchmarks/bench_hf_grow.py               # about 1 GiB
    .venv/bin/python benchmarks/bench_hf_grow.py --size-mb 64  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
N2N = [os.path.join(os.path.dirname(sys.executable), "n2n")]  # the console script beside this Python


def make_folder(folder: str, size_mb: int, layers: int = 8) -> dict:
    """A Llama-shaped bf16 folder of about `size_mb` MiB: hidden h, MLP 4h (rounded), GQA 2:1.

    Run in a child process (``--make``), so this process never holds torch or the tensors and
    each timed child's peak RSS is its own (a forked child starts with its parent's pages)."""
    import torch
    from safetensors.torch import save_file

    # parameters per layer ≈ 4h² (attention, kv half) + 3·h·4h (MLP) ≈ 15h²; embed + head: 2·V·h
    vocab = 32000
    per_mb = size_mb * 1024 * 1024 / 2  # bf16 numbers
    hidden = 256
    while layers * 15 * (hidden + 128) ** 2 + 2 * vocab * (hidden + 128) <= per_mb:
        hidden += 128
    heads, kv, inter = hidden // 64, hidden // 128, 4 * hidden
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "tie_word_embeddings": False, "max_position_embeddings": 2048, "rope_theta": 10000.0, "dtype": "bfloat16"}
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
         "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                  p + "self_attn.q_proj.weight": rand(heads * 64, hidden), p + "self_attn.k_proj.weight": rand(kv * 64, hidden),
                  p + "self_attn.v_proj.weight": rand(kv * 64, hidden), p + "self_attn.o_proj.weight": rand(hidden, heads * 64),
                  p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                  p + "mlp.down_proj.weight": rand(hidden, inter)})
    os.makedirs(folder, exist_ok=True)
    save_file(t, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    largest = max(x.numel() * x.element_size() for x in t.values())
    return {"config": cfg, "bytes": sum(x.numel() * x.element_size() for x in t.values()), "largest_tensor": largest}


def timed(argv: list, cwd: str) -> dict:
    """Wall time and peak RSS (MiB) of one child process (its own rusage, from wait4)."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({child.returncode}): {err.decode(errors='replace').strip()[-400:]}")
    return {"seconds": round(wall, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def mergekit_config(layers: int, every: int) -> str:
    """Passthrough slices giving the same layer order as ``--every K`` (block i·K-1 repeated)."""
    slices, start = [], 0
    for end in range(every, layers + 1, every):
        slices.append(f"  - sources:\n      - model: ./teacher\n        layer_range: [{start}, {end}]")
        slices.append(f"  - sources:\n      - model: ./teacher\n        layer_range: [{end - 1}, {end}]")
        start = end
    if start < layers:
        slices.append(f"  - sources:\n      - model: ./teacher\n        layer_range: [{start}, {layers}]")
    return "merge_method: passthrough\ndtype: bfloat16\nslices:\n" + "\n".join(slices) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--make", help=argparse.SUPPRESS)  # internal: build the folder, print its facts
    args = ap.parse_args()
    if args.make:
        print(json.dumps(make_folder(args.make, args.size_mb, args.layers)))
        return
    work = tempfile.mkdtemp(prefix="n2n-hf-bench-")
    try:
        made = subprocess.run([sys.executable, __file__, "--make", os.path.join(work, "teacher"), "--size-mb",
                               str(args.size_mb), "--layers", str(args.layers)], check=True, capture_output=True, text=True)
        info = json.loads(made.stdout)
        new_layers = args.layers + args.layers // args.every
        results = {"size_bytes": info["bytes"], "largest_tensor": info["largest_tensor"], "layers": args.layers,
                   "every": args.every, "hidden_size": info["config"]["hidden_size"]}
        results["cp"] = timed(["cp", "-r", "teacher", "copy"], work)
        results["n2n_deepen_every"] = timed(N2N + ["deepen", "teacher", "--every", str(args.every), "--block", "copy",
                                                   "--probes", "2", "-o", "deep"], work)
        # mergekit checks nothing: the like-for-like figure is n2n without its verification
        results["n2n_deepen_every_no_verify"] = timed(N2N + ["deepen", "teacher", "--every", str(args.every), "--block", "copy",
                                                             "--no-verify", "-o", "deep-nv"], work)
        results["n2n_grow_layers"] = timed(N2N + ["grow", "teacher", "--set", f"num_hidden_layers={new_layers}",
                                                  "--probes", "2", "-o", "grown"], work)
        if shutil.which("mergekit-yaml"):
            with open(os.path.join(work, "merge.yaml"), "w") as f:
                f.write(mergekit_config(args.layers, args.every))
            results["mergekit_passthrough"] = timed(["mergekit-yaml", "merge.yaml", "merged", "--no-copy-tokenizer"], work)
            mk = results["mergekit_passthrough"]["seconds"]
            results["ratio_n2n_deepen_over_mergekit"] = round(results["n2n_deepen_every"]["seconds"] / mk, 3)
            results["ratio_n2n_deepen_no_verify_over_mergekit"] = round(results["n2n_deepen_every_no_verify"]["seconds"] / mk, 3)
        else:
            results["mergekit_passthrough"] = None  # not installed here
        results["ratio_grow_over_cp"] = round(results["n2n_grow_layers"]["seconds"] / max(results["cp"]["seconds"], 1e-3), 3)
        results["rss_target_mib"] = round((2 * info["largest_tensor"]) / 2**20 + 300, 1)
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "hf_grow.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
