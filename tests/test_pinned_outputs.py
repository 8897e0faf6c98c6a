"""Pinned outputs: the shipped recipes' students, and a set of widen/deepen runs, digest for digest.

Refactors of the widening planner or the op registry must keep every existing result byte for
byte (issue 13). The digest covers the student's architecture YAML and every tensor's key, dtype,
shape and bytes (not the file, whose history names the tool version). A change that moves a
digest on purpose updates this table in the same commit, and says why in CHANGELOG.md.
"""

import hashlib
import os

import pytest
import torch

from n2nsurgery.deepen import deepen
from n2nsurgery.model import load_model
from n2nsurgery.recipe import apply_recipe, load_recipe
from n2nsurgery.widen import widen

ROOT = os.path.join(os.path.dirname(__file__), "..", "recipes")


def _model(name):
    return load_model(os.path.join(ROOT, f"{name}.safetensors"), os.path.join(ROOT, f"{name}.yaml"))


def digest(model) -> str:
    h = hashlib.sha256(model.arch.to_yaml().encode())
    for k in sorted(model.tensors.keys()):
        t = model.tensors.get(k).contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


RECIPES = {
    "cnn-wider-deeper": ("cnn", "c1da534ab837e4d76e12a6d3ef774942504d57407f7986e627ca785b31106df7"),
    "inception-wider": ("inception-half", "f120c511bc964629e987d5cf15d1fcf76daf360ad15208ebd1fbc31d29b59ec9"),
    "mlp-wider-deeper": ("mlp", "f73b4e3312321d2784d6e69f1221af96b883b6fe2538e53595765096329a7aa8"),
    "resnet-deeper": ("resnet", "5712fd69c8123fd3306e9b986a25b2cf77ef4f0b908b76da98f634cf46cb1b78"),
    "resnet-sqrt2": ("resnet", "1596b93b9df060539c7447c14cfefc23b6e1870dd1a8c346b2182c42e736b04a"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_shipped_recipe_students_are_pinned(recipe):
    teacher, expected = RECIPES[recipe]
    student, _ = apply_recipe(_model(teacher), load_recipe(os.path.join(ROOT, f"{recipe}.yaml")), verify=False)
    assert digest(student) == expected


RUNS = [
    ("widen", "cnn", ("conv2", 21), dict(split="random", seed=4), "2b093bfd5adaab3001da692304be000baf0c16ec075b6742e5cea3e8acc213ff"),
    ("widen", "cnn", ("conv2", 21), dict(noise=0.1, seed=5), "077f16e2180dcacaa63ca4b9a1de5c9f7fd7b7b5e7deb3ce8a94aecf1303b2ab"),
    ("widen", "mlp", ("fc1", 50), dict(seed=1), "4686dd62150869699499720d28d9f37fc5fd518043be5885b2cc2baeb9119f62"),
    ("widen", "resnet", ("b2_conv2", 20), dict(split="random", seed=8), "41d628c8bcd8db39476e8851bf483a38744b3a88a45d0a076cc02793c213bf22"),
    ("widen", "inception", ("b2", 9), dict(split="random"), "6268ce9c49bc15c3d9e61f58a617a449795b3b3185b9604df152a015a08efca7"),
    ("deepen", "cnn", ("relu2",), dict(batchnorm=True, kernel_size=5), "6e7d3dea5f0b33fdebdd8afed85bac403970403080ea4bd438dcf2e57d87c636"),
    ("deepen", "mlp", ("fc2",), dict(op="residual", activation="tanh", hidden=7), "e4484f4c96e98ac35e803f423d0f7c38b137344c877bc166c59c3eb17d7f2dbc"),
    ("deepen", "resnet", ("b2_add",), dict(op="residual"), "a14b2176ca9892d0ca1789bb1da9d27f45f5ed9bfadeaee0aa55a68f41ae5804"),
    ("deepen", "inception", ("pool",), dict(op="linear"), "54fadd4cf4db78c9d6a53c1e9e8e17df43e4b57bc1ff061b273c85987cc895f5"),
]


@pytest.mark.parametrize("kind, teacher, args, kwargs, expected", RUNS, ids=[f"{r[0]}-{r[1]}-{i}" for i, r in enumerate(RUNS)])
def test_widen_and_deepen_runs_are_pinned(kind, teacher, args, kwargs, expected):
    surgery = widen if kind == "widen" else deepen
    student, _ = surgery(_model(teacher), *args, **kwargs)
    assert digest(student) == expected
