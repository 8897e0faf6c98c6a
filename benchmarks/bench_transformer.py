#!/usr/bin/env python
"""Transformer growth benchmark: d_model, MLP and heads of a ~1 GiB Llama-shaped bfloat16 model.

Builds, in a temporary folder, ``llama.safetensors``: a Llama-shaped causal LM in bfloat16 with
random weights (vocab 32000, hidden 2048, 8 layers, 16 query heads over 4 KV heads of 128,
SwiGLU MLP of 5632: about 0.98 GiB), carrying its n2n architecture (built by
``n2nsurgery.hf_arch`` from the same config a Hugging Face folder would hold). Then, in one run,
it times against ``cp`` of the same file (medians, interleaved):

* ``n2n widen --layer model.embed_tokens --width 2560 --no-verify``: the whole residual stream
  (every writer, norm and reader of every layer, the untied head), zero-padded through RMSNorm;
* ``n2n widen --layer 'model.layers.*.mlp.up_proj' --width 7040 --no-verify``: every MLP, one
  coupled group each;
* ``n2n widen --layer model.layers.0.self_attn --kv-heads 8 --no-verify``: one layer's KV heads
  with their query groups;
* the d_model growth again WITH verification (64 probes of 8 tokens, values inside compared),

and reports each run's peak RSS against the largest tensor it writes (target: peak RSS <=
2 x largest output tensor + 300 MiB).

Run it from the repository root (about 4 GiB free in --tmp; a few minutes)::

    .venv/bin/python benchmarks/bench_transformer.py            # the full run
    .venv/bin/python benchmarks/bench_transformer.py --quick    # small sizes: a smoke test

Peak RSS is read per child with ``os.wait4``; as in ``bench_scale.py``, this parent never
imports torch (a vfork child is charged with its parent's peak), so the model is built by a
child (``--make``).
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

FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=4, head_dim=128)
QUICK = dict(vocab_size=4000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, head_dim=32)


def config(sizes: dict) -> dict:
    return dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                max_position_embeddings=2048, hidden_act="silu", attention_bias=False, mlp_bias=False, **sizes)


def shapes(cfg: dict) -> dict:
    """Every parameter's shape, under the Hugging Face state_dict keys."""
    v, h, i = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    return out


def make(dest: str, quick: bool) -> None:
    """Write the model tensor by tensor (the builder holds one tensor at a time)."""
    import torch

    from n2nsurgery.checkpoint import LazyTensor, write_checkpoint
    from n2nsurgery.hf_arch import arch_yaml_from_config

    cfg = config(QUICK if quick else FULL)

    def tensor(key, shape, seed):
        g = torch.Generator().manual_seed(seed)
        if len(shape) == 1:  # a norm's gain, off its init of 1 so rescaling it shows
            return (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        return (torch.randn(shape, generator=g) * shape[1] ** -0.5).to(torch.bfloat16)

    tensors = {k: LazyTensor(torch.bfloat16, s, lambda k=k, s=s, i=i: tensor(k, s, i))
               for i, (k, s) in enumerate(sorted(shapes(cfg).items()))}
    write_checkpoint(dest, tensors, {"format": "pt", "n2n.arch": arch_yaml_from_config(cfg)})


# ---------------------------------------------------------------------------- measuring


def n2n_exe() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "n2n")
    if not os.path.exists(path):
        sys.exit("the n2n console script is not next to this Python; run with the project's venv (.venv/bin/python)")
    return path


def measured(cmd: list) -> dict:
    """Run `cmd`; its wall time and peak RSS (of that child alone, via wait4)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read().decode(errors='replace')}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024}


def largest_tensor(path: str) -> int:
    """Bytes of the largest tensor in a safetensors file, from its header alone (no torch)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return max(e - b for k, v in header.items() if k != "__metadata__" for b, e in [v["data_offsets"]])


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--runs", type=int, default=3, help="runs of each timed command (median)")
    ap.add_argument("--tmp", default=None, help="folder for the checkpoints (default: the system's temporary folder)")
    ap.add_argument("--make", nargs=2, metavar=("DEST", "QUICK"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "transformer.json"))
    args = ap.parse_args()
    if args.make:
        make(args.make[0], args.make[1] == "1")
        return

    sizes = QUICK if args.quick else FULL
    n2n = n2n_exe()
    work = tempfile.mkdtemp(prefix="n2n-bench-tf-", dir=args.tmp)
    try:
        ckpt = os.path.join(work, "llama.safetensors")
        subprocess.run([sys.executable, __file__, "--make", ckpt, "1" if args.quick else "0"], check=True)
        size = os.path.getsize(ckpt)
        d, inter, kv = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_key_value_heads"]
        growths = {
            "d_model": ["--layer", "model.embed_tokens", "--width", str(d * 5 // 4)],
            "mlp": ["--layer", "model.layers.*.mlp.up_proj", "--width", str(inter * 5 // 4)],
            "kv_heads": ["--layer", "model.layers.0.self_attn", "--kv-heads", str(2 * kv)],
        }
        out = os.path.join(work, "out.safetensors")
        fig = {"checkpoint_bytes": size, "config": config(sizes), "quick": args.quick, "runs": args.runs, "growths": {}}
        cp_times = []
        times = {name: [] for name in growths}
        rss = {}
        for _ in range(args.runs):  # interleaved, so a busy moment hits both alike
            cp_times.append(measured(["cp", ckpt, out])["seconds"])
            os.unlink(out)
            for name, argv in growths.items():
                m = measured([n2n, "-q", "widen", ckpt, *argv, "--no-verify", "-o", out])
                times[name].append(m["seconds"])
                rss[name] = max(rss.get(name, 0), m["peak_rss"])
                largest = largest_tensor(out)
                fig["growths"].setdefault(name, {})["largest_output_tensor"] = largest
                fig["growths"][name]["output_bytes"] = os.path.getsize(out)
                os.unlink(out)
        cp = statistics.median(cp_times)
        fig["cp_median_s"] = cp
        for name in growths:
            g = fig["growths"][name]
            g["median_s"] = statistics.median(times[name])
            g["ratio_to_cp"] = g["median_s"] / cp
            g["peak_rss"] = rss[name]
            g["rss_bound"] = 2 * g["largest_output_tensor"] + 300 * MiB
            g["rss_within_bound"] = rss[name] <= g["rss_bound"]
        verified = measured([n2n, "-q", "widen", ckpt, *growths["d_model"], "--device", "cpu", "-o", out])
        fig["d_model_verified"] = {"seconds": verified["seconds"], "peak_rss": verified["peak_rss"],
                                   "ratio_to_cp": verified["seconds"] / cp}
        os.unlink(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"Llama-shaped bfloat16 checkpoint: {fmt(size)}; cp median {cp:.2f} s")
    for name, g in fig["growths"].items():
        print(f"  {name:9s} {g['median_s']:6.2f} s = {g['ratio_to_cp']:5.1f} x cp; peak RSS {fmt(g['peak_rss'])} "
              f"(bound {fmt(g['rss_bound'])}: 2 x largest output tensor {fmt(g['largest_output_tensor'])} + 300 MiB) "
              f"{'ok' if g['rss_within_bound'] else 'OVER'}")
    v = fig["d_model_verified"]
    print(f"  d_model verified: {v['seconds']:.2f} s = {v['ratio_to_cp']:.1f} x cp; peak RSS {fmt(v['peak_rss'])}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out if not args.quick else args.out.replace(".json", "-quick.json"), "w") as f:
        json.dump(fig, f, indent=2)


if __name__ == "__main__":
    main()
