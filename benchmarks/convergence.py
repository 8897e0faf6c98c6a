#!/usr/bin/env python
"""Does Net2Net train faster? The paper's two convergence experiments, in miniature (not a test).

Data: scikit-learn's bundled handwritten digits (1797 grey 8×8 images, no download), one fixed
stratified train/validation split. Models: :class:`DigitsCNN`, a small conv + batchnorm network
whose widths are constructor arguments; its architecture file is :data:`DIGITS_YAML`.

1. A **teacher** at half the channel widths is trained to a plateau.
2. **Wider** (Net2WiderNet): the teacher grown to full width by ``n2nsurgery.widen.widen`` (every
   conv and the hidden linear layer; ``split="random"``, which is exact and breaks the symmetry
   between replicas) against *random pad* (the full-width module with the teacher's weights in
   the old units and random weights for the new units, incoming AND outgoing, as the paper's
   baseline) and against *random init* (the full-width module from scratch).
3. **Deeper** (Net2DeeperNet): the teacher with an identity 3×3 convolution + ReLU inserted after
   the ReLU of each conv block by ``n2nsurgery.deepen.deepen`` against the same deeper
   architecture from scratch.

Every student is trained with the same optimiser (SGD, momentum 0.9, weight decay 5e-4), the same
cosine schedule and the same number of steps, over several seeds; validation accuracy (eval mode)
is recorded every ``eval_every`` steps starting at step 0. Learning rates, explicitly: the teacher
starts at ``teacher_lr``; Net2Net students use ``teacher_lr / 10`` (the paper's finding); every
baseline is run at both ``teacher_lr / 10`` and ``teacher_lr`` and is reported at whichever of
the two gave the higher mean final accuracy (its best LR, chosen after the fact: generous to it).
For contrast, the table and plots also show the Net2Net students at the teacher's own LR
(``net2net_at_teacher_lr``; not in the JSON, whose methods are fixed).

The script asserts that every Net2Net student starts where the teacher is: the same logits (max
|Δ| ≤ 1e-4 · max |y|) and the same validation accuracy (within 0.5%).

``--regime underfit`` (issue 17) swaps the half-width teacher, which fits its training set
(100% train accuracy, so its students have nothing left to learn), for one too small to fit it
(:data:`TINY_WIDTHS`; its train accuracy is asserted to stay under
:data:`UNDERFIT_MAX_TRAIN_ACC`): the paper's regime, whose Inception teachers underfit ImageNet.
Everything else (students, baselines, learning rates, steps, seeds) is the same; outputs are
named ``*-underfit*``.

Run it from the repository root (needs the ``bench`` extra: ``pip install -e '.[bench]'``)::

    .venv/bin/python benchmarks/convergence.py --quick    # ~1 minute on 2 cores
    .venv/bin/python benchmarks/convergence.py            # the README's numbers (several minutes)
    .venv/bin/python benchmarks/convergence.py --regime underfit    # a teacher that underfits

Outputs: ``--json PATH`` (``{"wider": {"teacher_val_acc", "teacher_train_acc", "methods": {name:
{"steps", "val_acc"}}}, "deeper": {...}}``, val_acc averaged over seeds), one PNG per experiment in ``--plots DIR``, and
a Markdown table of the results on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

import n2nsurgery
from n2nsurgery.deepen import deepen
from n2nsurgery.widen import widen

RESULTS = Path(__file__).resolve().parent / "results"

# An extra run, in the table and plots but not in the JSON (whose methods are fixed): the Net2Net
# students at the teacher's own initial LR instead of a tenth of it.
EXTRA = "net2net_at_teacher_lr"

# The teacher's widths are half of these (the paper widens a narrower Inception to the standard one).
FULL_WIDTHS = {"c1": 16, "c2": 32, "hidden": 64}
HALF_WIDTHS = {k: v // 2 for k, v in FULL_WIDTHS.items()}
# --regime underfit (issue 17): a teacher too small to fit its training set, so the wider and
# deeper students have something left to learn (the paper's regime: its Inception teachers
# underfit ImageNet). The half-width teacher above fits the training set (100%).
TINY_WIDTHS = {"c1": 2, "c2": 4, "hidden": 4}
REGIMES = {"plateau": HALF_WIDTHS, "underfit": TINY_WIDTHS}
# The underfit teacher must stay well under this training accuracy (asserted), or the regime is not one.
UNDERFIT_MAX_TRAIN_ACC = 0.97

# Where Net2DeeperNet inserts its identity convolutions, and the names it gives them (the
# attribute names of DigitsCNN(deeper=True), so the student's tensors load by state_dict key).
DEEPEN_AT = {"relu1": "conv1b", "relu2": "conv2b"}

# The n2n-arch/1 file of DigitsCNN (widths come from the tensors, so one file serves every width).
DIGITS_YAML = """\
format: n2n-arch/1
name: digits-cnn
inputs:
  x: {shape: [1, 8, 8], dtype: float32}
nodes:
  - {name: conv1, op: conv2d, in: x, padding: 1}
  - {name: bn1, op: batchnorm, in: conv1}
  - {name: relu1, op: relu, in: bn1}
  - {name: pool1, op: max_pool2d, in: relu1, kernel_size: 2}
  - {name: conv2, op: conv2d, in: pool1, padding: 1}
  - {name: bn2, op: batchnorm, in: conv2}
  - {name: relu2, op: relu, in: bn2}
  - {name: pool2, op: max_pool2d, in: relu2, kernel_size: 2}
  - {name: flat, op: flatten, in: pool2}
  - {name: fc1, op: linear, in: flat}
  - {name: relu3, op: relu, in: fc1}
  - {name: fc2, op: linear, in: relu3}
outputs: [fc2]
"""


class DigitsCNN(nn.Module):
    """x[1, 8, 8] → (conv3×3 + bn + relu [+ conv3×3 + relu] → maxpool2) × 2 → flatten → fc + relu → fc[10].

    Args:
        c1, c2: channels of the two conv blocks.
        hidden: units of the hidden linear layer.
        deeper: add the identity-shaped 3×3 convolutions ``conv1b``/``conv2b`` (+ ReLU) that
            ``deepen`` inserts after ``relu1``/``relu2``: the Net2DeeperNet architecture.
    """

    def __init__(self, c1: int = 16, c2: int = 32, hidden: int = 64, deeper: bool = False):
        super().__init__()
        self.deeper = deeper
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        if deeper:
            self.conv1b = nn.Conv2d(c1, c1, 3, padding=1)
            self.conv2b = nn.Conv2d(c2, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.deeper:
            x = torch.relu(self.conv1b(x))
        x = torch.max_pool2d(x, 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        if self.deeper:
            x = torch.relu(self.conv2b(x))
        x = torch.max_pool2d(x, 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


@dataclass(frozen=True)
class Config:
    """One run's sizes. The learning rates and optimiser are the same in every mode."""

    seeds: int  # student seeds (data order, widen map, random weights)
    teacher_steps: int  # SGD steps of the teacher (cosine from teacher_lr to 0)
    student_steps: int  # SGD steps of every student (cosine from its LR to 0)
    eval_every: int  # validation accuracy every this many student steps (and at step 0)
    teacher_lr: float = 0.1  # the teacher's initial LR; Net2Net students get a tenth of it
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_fraction: float = 0.3  # of the 1797 digits, stratified, split with random_state=0
    regime: str = "plateau"  # the teacher's widths: REGIMES[regime] (wider students: FULL_WIDTHS)

    @property
    def teacher_widths(self) -> dict:
        return REGIMES[self.regime]


# The half-width teacher plateaus after about 400 steps (98.2% validation accuracy, vs 99.2% for
# the full-width net trained from scratch), so both modes train it well past that point.
QUICK = Config(seeds=3, teacher_steps=600, student_steps=300, eval_every=10)
FULL = Config(seeds=5, teacher_steps=2000, student_steps=1000, eval_every=20)


# ------------------------------------------------------------------------------------- data


def load_digits_split(val_fraction: float) -> tuple:
    """(x_train, y_train, x_val, y_val): float32 [N, 1, 8, 8] standardised with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_val = train_test_split(
        torch.arange(len(y)).numpy(), test_size=val_fraction, stratify=y.numpy(), random_state=0
    )
    idx_train, idx_val = torch.as_tensor(idx_train), torch.as_tensor(idx_val)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return x[idx_train], y[idx_train], x[idx_val], y[idx_val]


# --------------------------------------------------------------------------------- training


def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode (batchnorm on its running statistics)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        acc = float((module(x).argmax(1) == y).float().mean())
    module.train(was_training)
    return acc


def train(module: nn.Module, data: tuple, cfg: Config, lr: float, steps: int, seed: int, eval_every: int) -> tuple:
    """SGD with momentum and a cosine schedule from `lr` to 0; returns (steps, val_acc) recorded
    at step 0 and every `eval_every` steps (and at the last step)."""
    x_train, y_train, x_val, y_val = data
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(1000 + seed)  # the data order: the same for every method
    order, cursor = torch.randperm(len(y_train), generator=gen), 0
    recorded_steps, val_acc = [0], [accuracy(module, x_val, y_val)]
    module.train()
    for step in range(1, steps + 1):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(y_train), generator=gen), 0
        batch = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        loss = nn.functional.cross_entropy(module(x_train[batch]), y_train[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            recorded_steps.append(step)
            val_acc.append(accuracy(module, x_val, y_val))
    module.eval()
    return recorded_steps, val_acc


def train_teacher(data: tuple, cfg: Config) -> tuple:
    """The teacher (cfg.teacher_widths), trained from seed 0; returns (module, its val-acc curve)."""
    torch.manual_seed(0)
    teacher = DigitsCNN(**cfg.teacher_widths)
    steps, acc = train(teacher, data, cfg, cfg.teacher_lr, cfg.teacher_steps, seed=0, eval_every=max(1, cfg.teacher_steps // 10))
    return teacher, (steps, acc)


# ------------------------------------------------------------------------------- students


def _teacher_model(teacher: nn.Module):
    """The teacher as an n2nsurgery Model: its own state_dict bound to DIGITS_YAML."""
    return n2nsurgery.model_from_state_dict(DIGITS_YAML, {k: v.detach().clone() for k, v in teacher.state_dict().items()})


def _load(module: nn.Module, model) -> nn.Module:
    """Load an n2nsurgery Model's tensors into `module` by state_dict key (strict)."""
    module.load_state_dict({k: model.tensors.get(k) for k in model.tensors.keys()}, strict=True)
    return module.eval()


def net2net_wider(teacher: nn.Module, seed: int) -> nn.Module:
    """The teacher widened to FULL_WIDTHS by n2nsurgery: conv1, conv2 and fc1, one after another."""
    model = _teacher_model(teacher)
    for layer, key in (("conv1", "c1"), ("conv2", "c2"), ("fc1", "hidden")):
        model, _ = widen(model, layer, FULL_WIDTHS[key], split="random", seed=seed)
    return _load(DigitsCNN(**FULL_WIDTHS), model)


def random_pad(teacher: nn.Module, seed: int) -> nn.Module:
    """The full-width module with the teacher's weights in the old units; everything touching a
    new unit (its incoming and outgoing weights, its batchnorm) keeps its fresh random init."""
    torch.manual_seed(seed)
    student = DigitsCNN(**FULL_WIDTHS)
    new = student.state_dict()
    with torch.no_grad():
        for key, old in teacher.state_dict().items():
            if old.dim() == 0:
                new[key].copy_(old)
            else:
                new[key][tuple(slice(0, n) for n in old.shape)].copy_(old)
    student.load_state_dict(new)
    return student.eval()


def widths_of(module: DigitsCNN) -> dict:
    return {"c1": module.conv1.out_channels, "c2": module.conv2.out_channels, "hidden": module.fc1.out_features}


def net2net_deeper(teacher: nn.Module) -> nn.Module:
    """The teacher with an identity 3×3 conv + ReLU after each conv block's ReLU, by n2nsurgery."""
    model = _teacher_model(teacher)
    for after, name in DEEPEN_AT.items():
        model, _ = deepen(model, after, op="conv", kernel_size=3, name=name)
    return _load(DigitsCNN(**widths_of(teacher), deeper=True), model)


def random_init(seed: int, deeper: bool = False, widths: dict = None) -> nn.Module:
    """The wider (full-width) or deeper (the teacher's widths, default half, deeper=True)
    architecture from scratch."""
    torch.manual_seed(seed)
    return DigitsCNN(**(widths or (HALF_WIDTHS if deeper else FULL_WIDTHS)), deeper=deeper).eval()


def check_starts_at_teacher(teacher: nn.Module, student: nn.Module, data: tuple, what: str) -> None:
    """Net2Net's promise, asserted: same logits on the validation set, same accuracy (±0.5%)."""
    x_val, y_val = data[2], data[3]
    teacher.eval(), student.eval()
    with torch.no_grad():
        want, got = teacher(x_val), student(x_val)
    rel = float((got - want).abs().max()) / float(want.abs().max())
    assert rel <= 1e-4, f"{what}: the Net2Net student's logits differ from the teacher's (max |Δ|/max|y| = {rel:.2e})"
    t_acc, s_acc = accuracy(teacher, x_val, y_val), accuracy(student, x_val, y_val)
    assert abs(t_acc - s_acc) <= 0.005, f"{what}: the Net2Net student starts at {s_acc:.4f}, the teacher is at {t_acc:.4f}"


# ----------------------------------------------------------------------------- experiments


def _curves(make, data: tuple, cfg: Config, lr: float) -> list:
    """Train make(seed) for every seed at `lr`; a list of (steps, val_acc), one per seed."""
    return [train(make(seed), data, cfg, lr, cfg.student_steps, seed, cfg.eval_every) for seed in range(cfg.seeds)]


def _best_lr(make, data: tuple, cfg: Config, lrs: tuple) -> tuple:
    """Train at each LR; keep the LR with the highest mean final accuracy. Returns (lr, curves)."""
    runs = {lr: _curves(make, data, cfg, lr) for lr in lrs}
    best = max(lrs, key=lambda lr: (_mean([acc[-1] for _, acc in runs[lr]]), _mean([sum(acc) for _, acc in runs[lr]])))
    return best, runs[best]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def run_experiments(cfg: Config, log=print) -> dict:
    """Both experiments. Returns {"wider"/"deeper": {"teacher_val_acc", "teacher_curve",
    "methods": {name: {"lr", "curves": [(steps, val_acc) per seed]}}}}; see :func:`summary`."""
    data = load_digits_split(cfg.val_fraction)
    t0 = time.perf_counter()
    teacher, teacher_curve = train_teacher(data, cfg)
    teacher_acc, teacher_train_acc = accuracy(teacher, data[2], data[3]), accuracy(teacher, data[0], data[1])
    log(
        f"teacher {cfg.teacher_widths} ({cfg.regime}): val acc {teacher_acc:.4f}, train acc {teacher_train_acc:.4f} after {cfg.teacher_steps} steps "
        f"(last evaluations: {', '.join(f'{a:.3f}' for a in teacher_curve[1][-4:])}; {time.perf_counter() - t0:.1f}s)"
    )
    if cfg.regime == "underfit":
        assert teacher_train_acc <= UNDERFIT_MAX_TRAIN_ACC, (
            f"the underfit teacher {cfg.teacher_widths} reached train accuracy {teacher_train_acc:.4f} "
            f"(> {UNDERFIT_MAX_TRAIN_ACC}): it fits its data; make TINY_WIDTHS smaller")
    student_lr, baseline_lrs = cfg.teacher_lr / 10, (cfg.teacher_lr / 10, cfg.teacher_lr)

    def make_net2net_wider(seed):
        student = net2net_wider(teacher, seed)
        check_starts_at_teacher(teacher, student, data, f"wider (seed {seed})")
        return student

    def make_net2net_deeper(seed):
        student = net2net_deeper(teacher)
        check_starts_at_teacher(teacher, student, data, f"deeper (seed {seed})")
        return student

    plans = {
        "wider": {
            "net2net": (make_net2net_wider, (student_lr,)),
            "random_pad": (lambda seed: random_pad(teacher, 100 + seed), baseline_lrs),
            "random_init": (lambda seed: random_init(200 + seed), baseline_lrs),
            EXTRA: (make_net2net_wider, (cfg.teacher_lr,)),
        },
        "deeper": {
            "net2net": (make_net2net_deeper, (student_lr,)),
            "random_init": (lambda seed: random_init(300 + seed, deeper=True, widths=cfg.teacher_widths), baseline_lrs),
            EXTRA: (make_net2net_deeper, (cfg.teacher_lr,)),
        },
    }
    results = {}
    for experiment, methods in plans.items():
        results[experiment] = {
            "teacher_val_acc": teacher_acc,
            "teacher_train_acc": teacher_train_acc,
            "teacher_curve": teacher_curve,
            "methods": {},
        }
        for method, (make, lrs) in methods.items():
            t1 = time.perf_counter()
            lr, curves = _best_lr(make, data, cfg, lrs)
            results[experiment]["methods"][method] = {"lr": lr, "curves": curves}
            finals = [acc[-1] for _, acc in curves]
            log(
                f"{experiment:6} {method:11} lr {lr:g} (of {', '.join(f'{v:g}' for v in lrs)}): step 0 "
                f"{_mean(acc[0] for _, acc in curves):.4f}, final {_mean(finals):.4f} "
                f"[{min(finals):.4f}, {max(finals):.4f}] ({time.perf_counter() - t1:.1f}s)"
            )
    return results


def summary(results: dict) -> dict:
    """The JSON of the issue: per experiment, the teacher's accuracy and each method's steps and
    val_acc averaged over seeds."""
    out = {}
    for experiment, res in results.items():
        methods = {}
        for method, m in res["methods"].items():
            if method == EXTRA:
                continue
            steps = m["curves"][0][0]
            methods[method] = {
                "steps": list(steps),
                "val_acc": [round(_mean(acc[i] for _, acc in m["curves"]), 6) for i in range(len(steps))],
            }
        out[experiment] = {"teacher_val_acc": round(res["teacher_val_acc"], 6),
                           "teacher_train_acc": round(res["teacher_train_acc"], 6), "methods": methods}
    return out


def markdown_table(results: dict) -> str:
    """Teacher accuracy and each method's mean (over seeds) accuracy at step 0, mid-way and the end."""
    lines = []
    for experiment, res in results.items():
        any_curve = next(iter(res["methods"].values()))["curves"][0][0]
        mid = len(any_curve) // 2
        s_mid, s_end = any_curve[mid], any_curve[-1]
        lines += [
            f"**{experiment}** (teacher: val acc {100 * res['teacher_val_acc']:.1f}%, train acc {100 * res['teacher_train_acc']:.1f}%)",
            "",
            f"| method | LR | step 0 | step {s_mid} | step {s_end} (min–max over seeds) | first step at the teacher's acc |",
            "|---|---|---|---|---|---|",
        ]
        for method, m in res["methods"].items():
            accs = [acc for _, acc in m["curves"]]
            finals = [a[-1] for a in accs]
            mean_curve = [_mean(a[i] for a in accs) for i in range(len(any_curve))]
            # "At the teacher's accuracy": the mean over seeds within half a point of it.
            reached = next((s for s, a in zip(any_curve, mean_curve) if a >= res["teacher_val_acc"] - 0.005), None)
            lines.append(
                f"| {method} | {m['lr']:g} | {100 * mean_curve[0]:.1f}% | {100 * mean_curve[mid]:.1f}% "
                f"| {100 * _mean(finals):.1f}% ({100 * min(finals):.1f}–{100 * max(finals):.1f}) "
                f"| {'never' if reached is None else reached} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- plots


def plot(results: dict, folder: Path, suffix: str = "") -> list:
    """One PNG per experiment: mean val accuracy vs step per method, with the min–max band over
    seeds; the right panel zooms on the top of the range. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    colours = {"net2net": "tab:blue", "random_pad": "tab:orange", "random_init": "tab:green", EXTRA: "tab:purple"}
    written = []
    for experiment, res in results.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        teacher_acc = res["teacher_val_acc"]
        for ax, zoom in zip(axes, (False, True)):
            for method, m in res["methods"].items():
                steps = m["curves"][0][0]
                accs = torch.tensor([acc for _, acc in m["curves"]], dtype=torch.float64)
                colour = colours.get(method)
                style = ":" if method == EXTRA else "-"
                ax.plot(steps, accs.mean(0), style, label=f"{method} (lr {m['lr']:g})", color=colour, lw=1.6)
                ax.fill_between(steps, accs.min(0).values, accs.max(0).values, color=colour, alpha=0.2, lw=0)
            ax.axhline(teacher_acc, color="grey", ls="--", lw=1, label=f"teacher ({100 * teacher_acc:.1f}%)")
            ax.set_xlabel("student SGD step")
            ax.set_ylabel("validation accuracy")
            ax.grid(alpha=0.3)
            if zoom:
                ax.set_ylim(max(0.0, teacher_acc - 0.06), 1.0)
                ax.set_title("zoom on the top")
            else:
                ax.set_ylim(0, 1.0)
                ax.set_title(f"Net2{'Wider' if experiment == 'wider' else 'Deeper'}Net on digits (mean, min–max over seeds)")
                ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = folder / f"{experiment}{suffix}.png"
        fig.savefig(path, dpi=90)
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
    parser.add_argument("--quick", action="store_true", help="fewer steps and seeds (about a minute on 2 cores)")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="plateau",
                        help="plateau: the half-width teacher, which fits its training set (the default); underfit: a "
                             "teacher too small to fit it (widths %s), the paper's regime" % (TINY_WIDTHS,))
    parser.add_argument("--json", type=Path, help="write the results JSON here (default: benchmarks/results/convergence[-underfit][-quick].json)")
    parser.add_argument("--plots", type=Path, help="write wider[-underfit][-quick].png and deeper[...].png here (default: benchmarks/results)")
    parser.add_argument("--seeds", type=int, help="override the number of student seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: these models are too small to gain from more)")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, args.threads))
    cfg = replace(QUICK if args.quick else FULL, regime=args.regime)
    if args.seeds is not None:
        cfg = replace(cfg, seeds=max(1, args.seeds))
    suffix = ("-underfit" if args.regime == "underfit" else "") + ("-quick" if args.quick else "")
    json_path = args.json or RESULTS / f"convergence{suffix}.json"
    plots_dir = args.plots or RESULTS

    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"config: {cfg}")
    results = run_experiments(cfg, log)
    _atomic_write(json_path, json.dumps(summary(results), indent=1) + "\n")
    for path in plot(results, plots_dir, suffix):
        log(f"wrote {path}")
    log(f"wrote {json_path}; total {time.perf_counter() - t0:.1f}s")
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
