#!/usr/bin/env python
"""Does growing a transformer with `n2n grow` train faster than starting over? (issue 17; not a test)

A miniature of the regime where people grow language models: the teacher *underfits* (it is small
and trained for a short budget), so a bigger student has something left to learn.

- **Data**: a byte-level corpus that needs no download: a fixed list of the Python standard
  library's own source files (:data:`STDLIB_FILES`, read from this interpreter's ``stdlib``; each
  file's path, size and sha256 go into the results, and a missing file stops the run). The first
  90% of every file is training text, the last 10% validation text. Tokens are bytes (vocab 256).
- **Teacher**: a Llama (``transformers.LlamaForCausalLM`` built from a config, random init):
  2 layers, hidden 64, 4 query heads over 2 KV heads, MLP 128, untied head; trained
  ``teacher_steps`` steps.
- **Students**, all the same architecture (hidden 128, 8 heads over 4 KV heads, MLP 256,
  4 layers; head_dim 16 as the teacher's), the same optimiser (AdamW), data order (per seed),
  schedule (linear warm-up, cosine to a tenth) and number of steps:

  * ``n2n``: the teacher saved with ``save_pretrained``, grown by this project's
    ``plan_growth`` + ``run_plan`` (what ``n2n grow --set ...`` runs, verified step by step and
    end to end) with every default: the residual stream zero-padded through the RMSNorms (the
    readers' new input columns drawn at random: exact, since they read the norms' zeros, and
    it lets the new coordinates get gradient), KV heads copied with their query groups, MLP
    units copied (equal shares), two new blocks that copy their neighbour with zeroed writers
    (LLaMA-Pro);
  * ``n2n_random``: the same with ``--split random`` (copies share their outgoing weights in
    random proportions: exact, and the copies stop getting identical gradients);
  * ``scratch``: the student architecture from its random init;
  * ``naive_copy``: the student's random init with the teacher's tensors pasted into the top-left
    corner of each (layer i into layer i; the new layers stay random): what people do by hand.
    It is not function-preserving;
  * ``scratch_long``: ``scratch`` trained for ``student_steps`` plus the teacher's training
    compute in student steps, its schedule stretched to that length: the baseline at **equal
    total compute** with the grown students, whose budget includes the teacher's training.

- **Compute**: a training step costs about 6 × N × tokens FLOPs (forward 2N, backward 4N per
  token), N the parameters a token's computation multiplies through: every parameter but the
  input embedding table (a lookup). Attention's T² term (T = 128: about 10% more for the student) and the
  evaluations are not counted. Grown and naive students start at the teacher's training compute.
- **Checked**: every grown student loads into ``LlamaForCausalLM`` at the student config with
  strict loading, and its step-0 validation loss is the teacher's (asserted: relative difference
  ≤ 1e-4, logits ≤ 1e-4 × max |logit|); the naive copy's is not.

Run it from the repository root (needs transformers; the plots need matplotlib: the ``bench``
extra, ``pip install -e '.[bench]'``)::

    .venv/bin/python benchmarks/grow_lm.py --quick    # under 2 minutes on 2 cores
    .venv/bin/python benchmarks/grow_lm.py            # docs/evidence.md's numbers (under 15 minutes)

Outputs: ``--json PATH`` (default ``benchmarks/results/grow_lm[-quick].json``: the corpus, the
configs, the teacher, each method's validation-loss curve per seed and averaged, against steps
and against total compute, and the headline numbers), ``grow_lm[-quick]-steps.png`` and
``grow_lm[-quick]-compute.png`` in ``--plots DIR``, and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# The corpus: standard-library modules that exist as plain files from Python 3.10 to 3.13, chosen
# for size (about 1.3 MB in 3.11). Their bytes differ between Python versions, so the results
# record each file's size and sha256: numbers are comparable only between equal hashes.
STDLIB_FILES = (
    "argparse.py", "ast.py", "base64.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "csv.py", "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py",
    "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "pprint.py", "queue.py", "random.py", "shutil.py", "statistics.py", "string.py", "subprocess.py",
    "tarfile.py", "textwrap.py", "threading.py", "tokenize.py", "typing.py",
)
VOCAB = 256  # bytes

METHODS = ("n2n", "n2n_random", "scratch", "naive_copy", "scratch_long")
GROWN = ("n2n", "n2n_random")  # function-preserving: step 0 is the teacher
FROM_TEACHER = GROWN + ("naive_copy",)  # their compute starts at the teacher's


@dataclass(frozen=True)
class Sizes:
    """A Llama's sizes (head_dim = hidden / heads: what transformers derives, and the same in
    teacher and student, so the rotary tables do not change)."""

    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int


@dataclass(frozen=True)
class Config:
    """One run's sizes. Optimiser and schedule are the same for every student."""

    seeds: int  # student seeds (init, growth maps, data order)
    teacher_steps: int  # AdamW steps of the teacher (its own warm-up + cosine)
    student_steps: int  # AdamW steps of every student but scratch_long
    eval_every: int  # validation loss every this many steps (and at step 0 and the end)
    batch_size: int = 8
    seq_len: int = 128
    # Peak LRs. 1e-3 was the best of 5e-4, 1e-3, 2e-3, 4e-3 and 8e-3 for the student from scratch
    # (seed 0, 500 steps); the grown students did better at 2e-3, so the common LR favours scratch.
    lr: float = 1e-3  # every student
    teacher_lr: float = 2e-3  # the small teacher takes a larger LR
    warmup: int = 30  # linear warm-up steps (every run)
    min_lr_ratio: float = 0.1  # the cosine ends at lr × this
    weight_decay: float = 0.1
    eval_windows: int = 64  # validation windows of seq_len + 1 bytes, evenly spaced
    teacher: Sizes = Sizes(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2)
    student: Sizes = Sizes(hidden=128, heads=8, kv_heads=4, intermediate=256, layers=4)


# The teacher's budget is short on purpose: it underfits (its training and validation losses
# are close and still falling when its schedule ends).
QUICK = Config(seeds=2, teacher_steps=200, student_steps=80, eval_every=20)
FULL = Config(seeds=3, teacher_steps=600, student_steps=400, eval_every=25)


# ------------------------------------------------------------------------------------- data


@dataclass
class Corpus:
    train: torch.Tensor  # int64 bytes
    val: torch.Tensor
    files: list  # {"path", "size", "sha256"} per file, in order


def load_corpus(val_fraction: float = 0.1) -> Corpus:
    """The bytes of :data:`STDLIB_FILES`: each file's first 90% to train, last 10% to validation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, val, files = [], [], []
    for rel in STDLIB_FILES:
        path = stdlib / rel
        if not path.is_file():
            raise SystemExit(
                f"grow_lm.py: the corpus file {rel} is not in this Python's standard library ({stdlib}); "
                f"the corpus is the fixed list STDLIB_FILES (Python {sys.version_info.major}.{sys.version_info.minor} here): "
                "run the benchmark with Python 3.10 to 3.13, or edit the list (results record every file's sha256)"
            )
        data = path.read_bytes()
        files.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        cut = int(len(data) * (1 - val_fraction))
        train.append(data[:cut])
        val.append(data[cut:])
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(val), files)


def eval_windows(stream: torch.Tensor, cfg: Config) -> torch.Tensor:
    """`cfg.eval_windows` windows of seq_len + 1 bytes, evenly spaced over `stream`: the same for
    every model, so curves differ by the model only."""
    last = len(stream) - cfg.seq_len - 1
    starts = torch.linspace(0, last, cfg.eval_windows).long()
    return torch.stack([stream[s : s + cfg.seq_len + 1] for s in starts.tolist()])


# ----------------------------------------------------------------------------------- models


def llama_config(sizes: Sizes, cfg: Config):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=sizes.hidden, num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.hidden // sizes.heads, intermediate_size=sizes.intermediate, num_hidden_layers=sizes.layers,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def new_llama(config, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def flops_per_step(model, cfg: Config) -> float:
    """6 × N × tokens per step, N = every parameter but the input embedding table (a lookup)."""
    n = sum(p.numel() for name, p in model.named_parameters() if name != "model.embed_tokens.weight")
    return 6.0 * n * cfg.batch_size * cfg.seq_len


# --------------------------------------------------------------------------------- training


def lr_at(step: int, total: int, peak: float, cfg: Config) -> float:
    """Linear warm-up to `peak` over cfg.warmup steps, then cosine to peak × min_lr_ratio at `total`."""
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def loss_on(model, windows: torch.Tensor, cfg: Config) -> float:
    """Mean next-byte cross-entropy (nats) over every position of `windows`, in eval mode."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(cfg.batch_size):
            logits = model(input_ids=chunk[:, :-1]).logits
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1), reduction="sum"))
            count += chunk[:, 1:].numel()
    return total / count


def train(model, corpus: Corpus, val: torch.Tensor, cfg: Config, steps: int, data_seed: int, eval_every: int, lr: float) -> dict:
    """AdamW on random crops of the training stream (their order fixed by `data_seed`); the
    validation loss at step 0, every `eval_every` steps and at the end."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # no decay on norm gains
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(data_seed)
    offsets = torch.arange(cfg.seq_len + 1)
    curve = {"steps": [0], "val_loss": [loss_on(model, val, cfg)]}
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg)
        starts = torch.randint(0, len(corpus.train) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = corpus.train[starts[:, None] + offsets]
        model.train()
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve["steps"].append(step + 1)
            curve["val_loss"].append(loss_on(model, val, cfg))
    curve["wall_s"] = round(time.perf_counter() - t0, 2)
    model.eval()
    return curve


# ------------------------------------------------------------------------------- students


def grow_with_n2n(teacher, cfg: Config, seed: int, split=None):
    """The teacher grown to cfg.student by this project: save_pretrained, then plan_growth +
    run_plan (each step verified against the model before it) and an end-to-end verification,
    as ``n2n grow FOLDER --set ... [--split random]`` does. Returns (LlamaForCausalLM, config
    dict, plan steps): the student's tensors loaded with strict=True into the class built from
    the config n2n would write."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from n2nsurgery.commit import commit
    from n2nsurgery.grow import plan_growth, run_plan
    from n2nsurgery.hf_folder import student_config
    from n2nsurgery.model import load_model

    s = cfg.student
    target = {"hidden_size": s.hidden, "num_key_value_heads": s.kv_heads, "num_attention_heads": s.heads,
              "intermediate_size": s.intermediate, "num_hidden_layers": s.layers}
    with tempfile.TemporaryDirectory() as folder:
        teacher.save_pretrained(folder)
        model = load_model(folder)
        plan = plan_growth(model, target, split=split)
        grown, _, renames = run_plan(model, plan, seed=seed)
        commit(model, grown, None, seed=seed, renames=renames, what="the whole growth")  # raises if not the teacher
        config = student_config(grown)
        state = {k: grown.tensors.get(k).clone() for k in grown.tensors.keys()}
    student = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "transformers_version"}))
    student.load_state_dict(state, strict=True)
    return student.eval(), config, [st.to_dict() for st in plan.steps]


def naive_copy(teacher, student_config, seed: int):
    """The student's random init with each teacher tensor pasted into the top-left corner of the
    same-named student tensor (teacher layer i into student layer i; later layers stay random)."""
    student = new_llama(student_config, seed)
    mine = student.state_dict()
    with torch.no_grad():
        for key, value in teacher.state_dict().items():
            mine[key][tuple(slice(0, n) for n in value.shape)].copy_(value)
    return student.eval()


def check_starts_at_teacher(teacher, student, val: torch.Tensor, cfg: Config, what: str) -> tuple:
    """Net2Net's promise, asserted: the same logits and the same validation loss. Returns
    (teacher loss, student loss)."""
    with torch.no_grad():
        want = teacher(input_ids=val[:8, :-1]).logits
        got = student(input_ids=val[:8, :-1]).logits
    rel = float((got - want).abs().max()) / float(want.abs().max())
    assert rel <= 1e-4, f"{what}: the grown student's logits differ from the teacher's (max |Δ|/max|y| = {rel:.2e})"
    t, s = loss_on(teacher, val, cfg), loss_on(student, val, cfg)
    assert abs(t - s) <= 1e-4 * t, f"{what}: the grown student starts at loss {s:.6f}, the teacher is at {t:.6f}"
    return t, s


def copies_left(student, cfg: Config) -> dict:
    """What training did with the new units, at the end: the largest |value| in the residual
    stream's new coordinates (the embedding's new columns; zero-padded by n2n, they move only if
    the readers' new columns let gradient through), and how many MLP
    units (up_proj rows) and KV heads (k_proj row blocks) of layer 0 are still copies of an
    earlier one (within 1e-6 of its largest |weight|)."""
    sd = student.state_dict()
    old_d = cfg.teacher.hidden
    head_dim = cfg.student.hidden // cfg.student.heads

    def duplicates(rows: torch.Tensor) -> int:
        dist = torch.cdist(rows, rows, p=float("inf"))
        tol = 1e-6 * float(rows.abs().max())
        return int(sum(bool((dist[j, :j] <= tol).any()) for j in range(1, len(rows))))

    k = sd["model.layers.0.self_attn.k_proj.weight"]
    return {
        "residual_new_dims_max_abs": float(sd["model.embed_tokens.weight"][:, old_d:].abs().max()),
        "mlp_units_still_copies": duplicates(sd["model.layers.0.mlp.up_proj.weight"]),
        "kv_heads_still_copies": duplicates(k.reshape(cfg.student.kv_heads, head_dim * k.shape[1])),
    }


# ----------------------------------------------------------------------------- experiment


def run_experiment(cfg: Config, log=print) -> dict:
    """Train the teacher, then every method for every seed. Returns the results dict that
    :func:`summary` turns into the JSON."""
    corpus = load_corpus()
    val, train_probe = eval_windows(corpus.val, cfg), eval_windows(corpus.train, cfg)
    log(f"corpus: {len(corpus.files)} stdlib files, {len(corpus.train):,} train bytes, {len(corpus.val):,} validation bytes")

    t0 = time.perf_counter()
    teacher = new_llama(llama_config(cfg.teacher, cfg), seed=0)
    teacher_curve = train(teacher, corpus, val, cfg, cfg.teacher_steps, data_seed=10_000, eval_every=cfg.eval_every, lr=cfg.teacher_lr)
    teacher_val, teacher_train = loss_on(teacher, val, cfg), loss_on(teacher, train_probe, cfg)
    teacher_fps = flops_per_step(teacher, cfg)
    log(f"teacher {asdict(cfg.teacher)}: val loss {teacher_val:.4f}, train loss {teacher_train:.4f} after "
        f"{cfg.teacher_steps} steps ({time.perf_counter() - t0:.1f}s)")

    grown0, student_cfg, plan = grow_with_n2n(teacher, cfg, seed=0)
    student_fps = flops_per_step(grown0, cfg)
    teacher_flops = cfg.teacher_steps * teacher_fps
    # scratch_long: the student steps the teacher's training would have paid for, added on top
    extra = round(teacher_flops / student_fps)
    from transformers import LlamaConfig

    arch = LlamaConfig(**{k: v for k, v in student_cfg.items() if k != "transformers_version"})  # every student's
    log(f"student: {sum(p.numel() for p in grown0.parameters()):,} parameters; teacher's training = {extra} student steps of compute")

    runs = {m: [] for m in METHODS}
    diagnostics = {m: [] for m in GROWN}
    step0 = {m: [] for m in METHODS}
    for seed in range(cfg.seeds):
        makers = {
            "n2n": lambda: grow_with_n2n(teacher, cfg, seed)[0],
            "n2n_random": lambda: grow_with_n2n(teacher, cfg, seed, split="random")[0],
            "scratch": lambda: new_llama(arch, 100 + seed),
            "naive_copy": lambda: naive_copy(teacher, arch, 100 + seed),
            "scratch_long": lambda: new_llama(arch, 100 + seed),
        }
        for method in METHODS:
            t1 = time.perf_counter()
            student = makers[method]()
            if method in GROWN:
                check_starts_at_teacher(teacher, student, val, cfg, f"{method} (seed {seed})")
            steps = cfg.student_steps + (extra if method == "scratch_long" else 0)
            curve = train(student, corpus, val, cfg, steps, data_seed=1000 + seed, eval_every=cfg.eval_every, lr=cfg.lr)
            runs[method].append(curve)
            step0[method].append(curve["val_loss"][0])
            if method in GROWN:
                diagnostics[method].append(copies_left(student, cfg))
            log(f"seed {seed} {method:12} step 0 {curve['val_loss'][0]:.4f} → {curve['val_loss'][-1]:.4f} after {steps} steps "
                f"({time.perf_counter() - t1:.1f}s)")
    return {
        "cfg": cfg, "corpus": corpus, "teacher": {"val_loss": teacher_val, "train_loss": teacher_train, "curve": teacher_curve,
        "flops_per_step": teacher_fps, "flops": teacher_flops, "parameters": sum(p.numel() for p in teacher.parameters())},
        "student": {"config": student_cfg, "flops_per_step": student_fps, "extra_steps": extra, "plan": plan,
                    "parameters": sum(p.numel() for p in grown0.parameters())},
        "runs": runs, "diagnostics": diagnostics,
    }


# --------------------------------------------------------------------------------- results


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def mean_curve(curves: list) -> list:
    return [round(_mean(c["val_loss"][i] for c in curves), 6) for i in range(len(curves[0]["val_loss"]))]


def compute_axis(method: str, steps: list, res: dict) -> list:
    """Total training FLOPs at each recorded step: a method that starts from the teacher starts
    at the teacher's training compute."""
    start = res["teacher"]["flops"] if method in FROM_TEACHER else 0.0
    return [start + s * res["student"]["flops_per_step"] for s in steps]


def first_step_at(steps: list, losses: list, target: float):
    """The first recorded step after step 0 whose loss is at or below `target` (None: never).
    After step 0: a grown student starts at the teacher's loss, leaves it in the first steps
    (the optimiser's warm-up moves it), and this says when it is back."""
    return next((s for s, v in zip(steps[1:], losses[1:]) if v <= target), None)


def headline(out: dict) -> dict:
    """The numbers the issue asks for, from the seed-averaged curves of the JSON `out`."""
    teacher, methods = out["teacher"], out["methods"]
    curves = {m: d["val_loss"] for m, d in methods.items()}
    steps = {m: d["steps"] for m, d in methods.items()}
    end = out["config"]["student_steps"]
    return {
        "teacher_val_loss": teacher["val_loss"],
        "teacher_train_loss": teacher["train_loss"],
        "step0_val_loss": {m: c[0] for m, c in curves.items()},
        # how far the first steps push the grown students above where they started
        "worst_val_loss_after_step0": {m: max(curves[m][1:]) for m in GROWN},
        "steps_to_teacher_loss": {m: first_step_at(steps[m], curves[m], teacher["val_loss"]) for m in METHODS},
        "teacher_training_in_student_steps": out["student"]["scratch_long_extra_steps"],
        "val_loss_at_equal_steps": {m: curves[m][steps[m].index(end)] for m in METHODS if m != "scratch_long"},
        "equal_steps": end,
        # the grown students' budget includes the teacher's training; scratch_long spends it on more steps
        "val_loss_at_equal_compute": {m: curves[m][-1] for m in FROM_TEACHER + ("scratch_long",)},
        "equal_compute_flops": methods["n2n"]["compute_flops"][-1],
    }


def summary(res: dict, wall_s: float) -> dict:
    """The results JSON: everything needed to redraw the plots and check the headline."""
    cfg = res["cfg"]
    methods = {}
    for m, curves in res["runs"].items():
        steps = curves[0]["steps"]
        methods[m] = {
            "steps": steps,
            "compute_flops": compute_axis(m, steps, res),
            "val_loss": mean_curve(curves),
            "val_loss_per_seed": [[round(v, 6) for v in c["val_loss"]] for c in curves],
            "train_wall_s_per_seed": [c["wall_s"] for c in curves],
        }
        if m in res["diagnostics"]:
            methods[m]["at_the_end"] = res["diagnostics"][m]
    t = res["teacher"]
    out = {
        "what": "byte-level Llama on Python stdlib sources: n2n-grown vs scratch vs naive copy (benchmarks/grow_lm.py)",
        "python": sys.version.split()[0],
        "corpus": {"stdlib": sysconfig.get_paths()["stdlib"], "files": res["corpus"].files,
                   "train_bytes": len(res["corpus"].train), "val_bytes": len(res["corpus"].val)},
        "config": {**{k: v for k, v in asdict(cfg).items() if k not in ("teacher", "student")},
                   "teacher": asdict(cfg.teacher), "student": asdict(cfg.student)},
        "flops": "6 x parameters (all but the input embedding) x tokens per training step; evaluations not counted",
        "teacher": {"parameters": t["parameters"], "steps": cfg.teacher_steps, "flops_per_step": t["flops_per_step"],
                    "flops": t["flops"], "val_loss": round(t["val_loss"], 6), "train_loss": round(t["train_loss"], 6),
                    "curve": {"steps": t["curve"]["steps"], "val_loss": [round(v, 6) for v in t["curve"]["val_loss"]]},
                    "train_wall_s": t["curve"]["wall_s"]},
        "student": {"parameters": res["student"]["parameters"], "flops_per_step": res["student"]["flops_per_step"],
                    "config": res["student"]["config"], "grow_plan": res["student"]["plan"],
                    "scratch_long_extra_steps": res["student"]["extra_steps"]},
        "methods": methods,
        "wall_s": round(wall_s, 1),
    }
    out["headline"] = headline(out)
    return out


def markdown_table(out: dict) -> str:
    h, cfg = out["headline"], out["config"]
    lines = [
        f"teacher: val loss {h['teacher_val_loss']:.3f}, train loss {h['teacher_train_loss']:.3f} (nats/byte) after "
        f"{cfg['teacher_steps']} steps; its training = {h['teacher_training_in_student_steps']} student steps of compute",
        "",
        f"| method | step 0 | step {h['equal_steps']} (min–max over seeds) | at equal compute | at or below the teacher's loss from step |",
        "|---|---|---|---|---|",
    ]
    for m, data in out["methods"].items():
        per_seed = [c[data["steps"].index(h["equal_steps"])] for c in data["val_loss_per_seed"]] if h["equal_steps"] in data["steps"] else []
        at_steps = f"{_mean(per_seed):.3f} ({min(per_seed):.3f}–{max(per_seed):.3f})" if m != "scratch_long" else "—"
        at_compute = f"{h['val_loss_at_equal_compute'][m]:.3f}" if m in h["val_loss_at_equal_compute"] else "—"
        reach = first_step_at(data["steps"], data["val_loss"], h["teacher_val_loss"])
        lines.append(f"| {m} | {data['val_loss'][0]:.3f} | {at_steps} | {at_compute} | {'never' if reach is None else reach} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- plots


COLOURS = {"n2n": "tab:blue", "n2n_random": "tab:purple", "scratch": "tab:green", "naive_copy": "tab:orange", "scratch_long": "tab:olive"}


def plot(out: dict, folder: Path, suffix: str = "") -> list:
    """grow_lm-steps.png (validation loss against the student's step) and grow_lm-compute.png
    (against total training FLOPs, the teacher's included): seed means with min–max bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    teacher = out["teacher"]
    written = []
    for axis in ("steps", "compute"):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        if axis == "compute":
            ax.plot([s * teacher["flops_per_step"] for s in teacher["curve"]["steps"]],
                    teacher["curve"]["val_loss"], color="grey", lw=1.4, label="teacher training")
        for m, data in out["methods"].items():
            x = data["steps"] if axis == "steps" else data["compute_flops"]
            per_seed = torch.tensor(data["val_loss_per_seed"], dtype=torch.float64)
            # n2n is drawn wide and pale: n2n_random lies on top of it
            wide = m == "n2n"
            ax.plot(x, data["val_loss"], color=COLOURS[m], lw=3.5 if wide else 1.6, alpha=0.5 if wide else 1.0,
                    ls=":" if m == "scratch_long" else "-", label=m)
            ax.fill_between(x, per_seed.min(0).values, per_seed.max(0).values, color=COLOURS[m], alpha=0.2, lw=0)
        ax.axhline(teacher["val_loss"], color="grey", ls="--", lw=1, label=f"teacher's loss ({teacher['val_loss']:.3f})")
        ax.set_xlabel("student training step" if axis == "steps" else "total training FLOPs (teacher's included)")
        ax.set_ylabel("validation loss (nats/byte)")
        top = max(out["headline"]["step0_val_loss"]["naive_copy"], teacher["val_loss"]) + 0.4
        ax.set_ylim(max(0.0, min(min(d["val_loss"]) for d in out["methods"].values()) - 0.1), top)
        ax.grid(alpha=0.3)
        ax.set_title(f"growing a byte-level Llama {'(per step)' if axis == 'steps' else '(at equal compute)'}; mean, min–max over seeds", fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        path = folder / f"grow_lm{suffix}-{axis}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------- main


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and seeds (under 2 minutes on 2 cores)")
    parser.add_argument("--json", type=Path, help="write the results JSON here (default: benchmarks/results/grow_lm[-quick].json)")
    parser.add_argument("--plots", type=Path, help="write grow_lm[-quick]-steps.png and -compute.png here (default: benchmarks/results)")
    parser.add_argument("--seeds", type=int, help="override the number of student seeds")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="train nothing: redo the headline, table and plots from a results JSON")
    # One thread: on 2 cores shared with other work, two threads ran 30x slower than one (they wait on each other)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, args.threads))
    cfg = QUICK if args.quick else FULL
    if args.seeds is not None:
        cfg = replace(cfg, seeds=max(1, args.seeds))
    suffix = "-quick" if args.quick else ""
    json_path = args.json or RESULTS / f"grow_lm{suffix}.json"
    if args.replot is not None:
        out = json.loads(args.replot.read_text())
        out["headline"] = headline(out)
        _atomic_write(json_path, json.dumps(out, indent=1) + "\n")
        for path in plot(out, args.plots or RESULTS, suffix):
            print(f"wrote {path}", file=sys.stderr)
        print(markdown_table(out))
        return 0

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar, once per growth
    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"config: {cfg}")
    out = summary(run_experiment(cfg, log), time.perf_counter() - t0)
    _atomic_write(json_path, json.dumps(out, indent=1) + "\n")
    for path in plot(out, args.plots or RESULTS, suffix):
        log(f"wrote {path}")
    log(f"wrote {json_path}; total {time.perf_counter() - t0:.1f}s")
    print(markdown_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
