"""Model step (forward, DCL loss, backward, SGD) of the small backbones in channels-first vs channels-last memory
format on the CPU, batch 256 x 2 views of 1x28x28: the measurement behind `model.channels_last=true` being the
default (docs/benchmarks.md). Run: .venv/bin/python benchmarks/channels_last.py
"""

import time

import torch

from contrastkit.config import MethodConfig
from contrastkit.losses import DCLLoss
from contrastkit.methods.base import build_projector
from contrastkit.models import build_backbone


def model_step_rate(name: str, widths: list[int], channels_last: bool, steps: int = 10, warmup: int = 3) -> float:
    """Source images/s (256 per step, 2 views each) of the median step."""
    torch.manual_seed(0)
    backbone, dim = build_backbone(name, 1, widths=widths, stem_stride=2)
    projector = build_projector(dim, MethodConfig())
    opt = torch.optim.SGD([*backbone.parameters(), *projector.parameters()], lr=0.1, momentum=0.9)
    x = torch.randn(512, 1, 28, 28)  # 2 views x 256 images
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    criterion = DCLLoss()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        z = projector(backbone(x))
        loss = criterion(*z.chunk(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return 256 / sorted(times)[len(times) // 2]


if __name__ == "__main__":
    for name in ("convnet", "small_resnet"):
        for cl in (False, True):
            rate = model_step_rate(name, [32, 64, 128, 256], cl)
            print(f"{name:13s} {'channels_last' if cl else 'channels_first':15s} {rate:7.0f} img/s")
