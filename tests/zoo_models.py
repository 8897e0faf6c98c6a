"""torchvision's classification models as teachers, and a student put back into torchvision.

Used by tests/test_zoo_models.py. Nothing is downloaded: every model is built from its library
definition with random weights, then given non-default norm statistics, biases and layer scales
(defaults would hide a wrong eps, a dropped mean or a layer scale of 1e-6 that mutes a block).

torchvision beside a CPU torch: see ``conftest.load_torchvision``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

def torchvision_models():
    """``torchvision.models``, or skip the test (torchvision is in the test extra)."""
    from conftest import load_torchvision

    if not load_torchvision():
        pytest.skip("torchvision is not installed (it is in the test extra: pip install -e '.[test]')")
    import torchvision.models

    return torchvision.models


@dataclass(frozen=True)
class Zoo:
    """One model: how to build it, the input side it runs at, and what its inspect may refuse."""

    build: Callable  # (torchvision.models) -> nn.Module
    side: int  # input is [3, side, side]: the smallest the model's downsampling allows, for speed
    # Substrings of the refusals inspect may give for this model's layers; any other is a failure.
    # Every model refuses its classifier (its width is the function's output).
    refusals: tuple = ("reaches model output",)
    # Layers the sample in the default run always includes (the model's special coupling).
    must: tuple = field(default_factory=tuple)


ZOO = {
    "resnet18": Zoo(lambda m: m.resnet18(num_classes=10), 32, must=("layer2.0.conv1",)),  # basic blocks
    "resnet50": Zoo(lambda m: m.resnet50(num_classes=10), 32, must=("layer1.0.conv3",)),  # bottlenecks, the stream
    "densenet121": Zoo(lambda m: m.densenet121(num_classes=10), 32, must=("features.denseblock1.denselayer1.conv2",)),
    "mobilenet_v2": Zoo(lambda m: m.mobilenet_v2(num_classes=10), 32, must=("features.2.conv.0.0",)),  # depthwise
    "mobilenet_v3_small": Zoo(lambda m: m.mobilenet_v3_small(num_classes=10), 32,
                              must=("features.1.block.1.fc1",)),  # squeeze-excitation, hardswish
    "efficientnet_b0": Zoo(lambda m: m.efficientnet_b0(num_classes=10), 32, must=("features.2.0.block.0.0",)),
    "squeezenet1_1": Zoo(lambda m: m.squeezenet1_1(num_classes=10), 64, must=("features.3.squeeze",)),  # fire concats
    "vgg11_bn": Zoo(lambda m: m.vgg11_bn(num_classes=10), 32, must=("classifier.0",)),
    "regnet_y_400mf": Zoo(lambda m: m.regnet_y_400mf(num_classes=10), 32,
                          must=("trunk_output.block1.block1-0.f.a.0",)),  # feeds a grouped conv
    "convnext_tiny": Zoo(lambda m: m.convnext_tiny(num_classes=10), 32,
                         must=("features.1.0.block.3",)),  # channels-last LayerNorm, layer scale
    "googlenet": Zoo(lambda m: m.googlenet(num_classes=10, aux_logits=False, init_weights=False), 64,
                     must=("inception3a.branch2.0.conv",)),  # max_pool ceil_mode, 4-way concats
    # A channel shuffle interleaves the two branches' channels: what reaches one is refused.
    "shufflenet_v2_x0_5": Zoo(lambda m: m.shufflenet_v2_x0_5(num_classes=10), 32,
                              refusals=("reaches model output", "a channel shuffle interleaves groups"),
                              must=("stage2.1.branch2.0",)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The model at its library definition, weights random (library init), then made non-default."""
    models = torchvision_models()
    torch.manual_seed(seed)
    return randomize(ZOO[name].build(models), ZOO[name].side, seed)


def randomize(module: nn.Module, side: int, seed: int = 0) -> nn.Module:
    """Norm affines, biases and layer scales away from their defaults, then batchnorm running
    statistics measured on random inputs and moved off them; eval mode.

    The statistics are measured, not drawn: drawn ones let the signal die out with depth, and a
    teacher whose output no longer depends on its input passes any check. Moving them by a few
    percent after keeps a wrong eps or a dropped mean visible."""
    gen = torch.Generator().manual_seed(seed)

    def like(t, lo, hi):
        return torch.rand(t.shape, generator=gen, dtype=t.dtype) * (hi - lo) + lo

    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    batchnorms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, norms) and getattr(mod, "weight", None) is not None:
                mod.weight.copy_(like(mod.weight, 0.5, 1.5))
                mod.bias.copy_(like(mod.bias, -0.2, 0.2))
            elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and mod.bias is not None:
                mod.bias.copy_(like(mod.bias, -0.2, 0.2))
            for name, p in mod.named_parameters(recurse=False):
                if name == "layer_scale":  # ConvNeXt's starts at 1e-6: every block nearly muted
                    p.copy_(like(p, 0.5, 1.5))
        for bn in batchnorms:
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the calibration batches
        module.train()
        for _ in range(2):
            module(torch.randn(8, 3, side, side, generator=gen))
        for bn in batchnorms:
            bn.running_mean.add_(like(bn.running_mean, -0.05, 0.05))
            # A floor of a tenth of the layer's mean variance: a channel the probes hardly move
            # would divide by ~0 and amplify float32 rounding to percents of the output.
            floor = 0.1 * float(bn.running_var.mean())
            bn.running_var.mul_(like(bn.running_var, 0.9, 1.1)).add_(floor)
    return module.eval()


def at_widths(teacher: nn.Module, student) -> nn.Module:
    """The teacher's own module class at the student's widths, holding the student's tensors.

    torchvision's constructors do not take per-layer widths, so the teacher module is copied and
    every parameter and buffer given the student's shape (and each conv its student ``groups``,
    which grow with a depthwise conv), then ``load_state_dict(strict=True)``: torchvision's
    forward, not n2n's executor, then computes the student.
    """
    state = {k: student.tensors.get(k) for k in student.tensors.keys()}
    # Copy the module's structure, not its tensors: each parameter and buffer becomes a meta
    # placeholder of the student's shape, which load_state_dict(assign=True) then replaces.
    memo = {}
    for path, mod in teacher.named_modules():
        prefix = f"{path}." if path else ""
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is not None:
                shape = state[prefix + name].shape if prefix + name in state else t.shape
                meta = torch.empty(shape, dtype=t.dtype, device="meta")
                memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    module = copy.deepcopy(teacher, memo)
    for path, mod in module.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            mod.groups = student.arch.node(path).resolved_attrs()["groups"]
            mod.out_channels, mod.in_channels = mod.weight.shape[0], mod.weight.shape[1] * mod.groups
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.num_features = mod.running_mean.shape[0]
        elif isinstance(mod, nn.LayerNorm):  # torchvision's LayerNorm2d passes normalized_shape on
            mod.normalized_shape = (mod.weight.shape[0],)
        elif isinstance(mod, nn.GroupNorm):
            mod.num_channels = mod.weight.shape[0]
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()
