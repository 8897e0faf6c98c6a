"""The shipped example teachers: ordinary ``torch.nn`` modules and their architecture files.

``recipes/*.safetensors`` and ``recipes/*.yaml`` were made by ``python -m n2nsurgery.examples
recipes``. Every class takes its widths as arguments, so a test can build the *wider* module a
student should load into, and compare the two with plain PyTorch.

Batchnorm layers get non-default running statistics and affine parameters (as after training),
because default statistics hide remapping bugs: with mean 0 and variance 1 a wrongly indexed
channel still looks right.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batchnorm trained-looking statistics: mean ≠ 0, var ≠ 1, weight ≠ 1, bias ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.3 * torch.randn(c, generator=g))
                m.num_batches_tracked.fill_(100)
    return module


class MLP(nn.Module):
    """x[16] → fc1 → relu → fc2 → relu → fc3[10]."""

    def __init__(self, h1: int = 32, h2: int = 32, n_in: int = 16, n_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(n_in, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, n_out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


MLP_YAML = """\
format: n2n-arch/1
name: mlp
inputs:
  x: {shape: [16], dtype: float32}
nodes:
  - {name: fc1, op: linear, in: x}
  - {name: relu1, op: relu, in: fc1}
  - {name: fc2, op: linear, in: relu1}
  - {name: relu2, op: relu, in: fc2}
  - {name: fc3, op: linear, in: relu2}
outputs: [fc3]
"""


class CNN(nn.Module):
    """x[3, 8, 6] → conv+bn+relu → maxpool → conv+bn+relu → flatten (of a non-square 4×3 map) → fc[10]."""

    def __init__(self, c1: int = 8, c2: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2 * 4 * 3, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


CNN_YAML = """\
format: n2n-arch/1
name: cnn
inputs:
  x: {shape: [3, 8, 6], dtype: float32}
nodes:
  - {name: conv1, op: conv2d, in: x, padding: 1}
  - {name: bn1, op: batchnorm, in: conv1}
  - {name: relu1, op: relu, in: bn1}
  - {name: pool1, op: max_pool2d, in: relu1, kernel_size: 2}
  - {name: conv2, op: conv2d, in: pool1, padding: 1}
  - {name: bn2, op: batchnorm, in: conv2}
  - {name: relu2, op: relu, in: bn2}
  - {name: flat, op: flatten, in: relu2}
  - {name: fc, op: linear, in: flat}
outputs: [fc]
"""


class ResNet(nn.Module):
    """A stem and two residual blocks: one with an identity skip, one with a 1×1 projection skip."""

    def __init__(self, c: int = 8, c2: int = 12, mid: int = 8, mid2: int | None = None):
        super().__init__()
        mid2 = c2 if mid2 is None else mid2  # block 2's inner width
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(c)
        self.b1_conv1 = nn.Conv2d(c, mid, 3, padding=1)
        self.b1_bn1 = nn.BatchNorm2d(mid)
        self.b1_conv2 = nn.Conv2d(mid, c, 3, padding=1)
        self.b1_bn2 = nn.BatchNorm2d(c)
        self.b2_conv1 = nn.Conv2d(c, mid2, 3, padding=1, stride=2)
        self.b2_bn1 = nn.BatchNorm2d(mid2)
        self.b2_conv2 = nn.Conv2d(mid2, c2, 3, padding=1)
        self.b2_bn2 = nn.BatchNorm2d(c2)
        self.b2_proj = nn.Conv2d(c, c2, 1, stride=2, bias=False)
        self.fc = nn.Linear(c2, 10)

    def forward(self, x):
        s = torch.relu(self.stem_bn(self.stem(x)))
        h = torch.relu(self.b1_bn1(self.b1_conv1(s)))
        s = torch.relu(s + self.b1_bn2(self.b1_conv2(h)))
        h = torch.relu(self.b2_bn1(self.b2_conv1(s)))
        s = torch.relu(self.b2_proj(s) + self.b2_bn2(self.b2_conv2(h)))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(s, 1), 1))


RESNET_YAML = """\
format: n2n-arch/1
name: resnet
inputs:
  x: {shape: [3, 8, 8], dtype: float32}
nodes:
  - {name: stem, op: conv2d, in: x, padding: 1}
  - {name: stem_bn, op: batchnorm, in: stem}
  - {name: stem_relu, op: relu, in: stem_bn}
  - {name: b1_conv1, op: conv2d, in: stem_relu, padding: 1}
  - {name: b1_bn1, op: batchnorm, in: b1_conv1}
  - {name: b1_relu1, op: relu, in: b1_bn1}
  - {name: b1_conv2, op: conv2d, in: b1_relu1, padding: 1}
  - {name: b1_bn2, op: batchnorm, in: b1_conv2}
  - {name: b1_add, op: add, in: [stem_relu, b1_bn2]}
  - {name: b1_relu, op: relu, in: b1_add}
  - {name: b2_conv1, op: conv2d, in: b1_relu, padding: 1, stride: 2}
  - {name: b2_bn1, op: batchnorm, in: b2_conv1}
  - {name: b2_relu1, op: relu, in: b2_bn1}
  - {name: b2_conv2, op: conv2d, in: b2_relu1, padding: 1}
  - {name: b2_bn2, op: batchnorm, in: b2_conv2}
  - {name: b2_proj, op: conv2d, in: b1_relu, stride: 2}
  - {name: b2_add, op: add, in: [b2_proj, b2_bn2]}
  - {name: b2_relu, op: relu, in: b2_add}
  - {name: pool, op: adaptive_avg_pool2d, in: b2_relu, output_size: 1}
  - {name: flat, op: flatten, in: pool}
  - {name: fc, op: linear, in: flat}
outputs: [fc]
"""


class Inception(nn.Module):
    """A stem and one Inception-style block: 1×1, 1×1→3×3, and pool→1×1 branches, concatenated."""

    def __init__(self, stem: int = 8, b1: int = 4, b2a: int = 4, b2: int = 6, b3: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        self.b1 = nn.Conv2d(stem, b1, 1)
        self.b2a = nn.Conv2d(stem, b2a, 1)
        self.b2 = nn.Conv2d(b2a, b2, 3, padding=1)
        self.b3 = nn.Conv2d(stem, b3, 1)
        self.fc = nn.Linear(b1 + b2 + b3, 10)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y1 = torch.relu(self.b1(s))
        y2 = torch.relu(self.b2(torch.relu(self.b2a(s))))
        y3 = torch.relu(self.b3(torch.max_pool2d(s, 3, 1, 1)))
        y = torch.cat([y1, y2, y3], 1)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


INCEPTION_YAML = """\
format: n2n-arch/1
name: inception
inputs:
  x: {shape: [3, 8, 8], dtype: float32}
nodes:
  - {name: stem, op: conv2d, in: x, padding: 1}
  - {name: stem_relu, op: relu, in: stem}
  - {name: b1, op: conv2d, in: stem_relu}
  - {name: b1_relu, op: relu, in: b1}
  - {name: b2a, op: conv2d, in: stem_relu}
  - {name: b2a_relu, op: relu, in: b2a}
  - {name: b2, op: conv2d, in: b2a_relu, padding: 1}
  - {name: b2_relu, op: relu, in: b2}
  - {name: b3_pool, op: max_pool2d, in: stem_relu, kernel_size: 3, stride: 1, padding: 1}
  - {name: b3, op: conv2d, in: b3_pool}
  - {name: b3_relu, op: relu, in: b3}
  - {name: cat, op: concat, in: [b1_relu, b2_relu, b3_relu], dim: 1}
  - {name: pool, op: adaptive_avg_pool2d, in: cat, output_size: 1}
  - {name: flat, op: flatten, in: pool}
  - {name: fc, op: linear, in: flat}
outputs: [fc]
"""

# name -> (module factory, architecture YAML)
EXAMPLES = {
    "mlp": (MLP, MLP_YAML),
    "cnn": (CNN, CNN_YAML),
    "resnet": (ResNet, RESNET_YAML),
    "inception": (Inception, INCEPTION_YAML),
}


def build(name: str, seed: int = 0, **widths) -> nn.Module:
    """The example module `name` with seeded weights and trained-looking batchnorm, in eval mode."""
    factory, _ = EXAMPLES[name]
    torch.manual_seed(seed)
    return randomize_batchnorm(factory(**widths), seed).eval()


def write_examples(folder: str) -> None:
    """Write ``<name>.safetensors`` (a plain state_dict, as a user would have) and ``<name>.yaml``."""
    from .checkpoint import write_checkpoint

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, (_, yaml_text) in EXAMPLES.items():
        module = build(name)
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        write_checkpoint(str(out / f"{name}.safetensors"), state, {"format": "pt"})
        (out / f"{name}.yaml").write_text(yaml_text)


# The Inception example at half its channel widths: the teacher of recipes/inception-wider.yaml,
# which grows every convolution back to the full widths of Inception() (the paper's
# Net2WiderNet experiment: a narrower Inception network widened to the standard one).
INCEPTION_HALF_WIDTHS = {"stem": 4, "b1": 2, "b2a": 2, "b2": 3, "b3": 2}


def write_inception_half(folder: str) -> None:
    """Write ``inception-half.safetensors`` (a plain state_dict) and ``inception-half.yaml``."""
    from .checkpoint import write_checkpoint

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    module = build("inception", **INCEPTION_HALF_WIDTHS)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    write_checkpoint(str(out / "inception-half.safetensors"), state, {"format": "pt"})
    (out / "inception-half.yaml").write_text(INCEPTION_YAML.replace("name: inception\n", "name: inception-half\n", 1))


if __name__ == "__main__":
    write_examples(sys.argv[1] if len(sys.argv) > 1 else "recipes")
    write_inception_half(sys.argv[1] if len(sys.argv) > 1 else "recipes")
