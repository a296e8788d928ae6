"""Time lightly's data pipeline against ours on the *same* model step (run beside contrastkit, never imported by it).

Needs lightly installed in a separate environment that can also import torch and contrastkit, e.g.:

    python3.11 -m venv /tmp/lvenv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > /tmp/lvenv/lib/python3.11/site-packages/contrastkit_venv.pth   # torch, torchvision, contrastkit
    /tmp/lvenv/bin/pip install --no-deps lightly==1.6.0
    /tmp/lvenv/bin/python benchmarks/lightly_pipeline.py --steps 100 --warmup 10

What runs (Fashion-MNIST train set from the Debian package, batch 256, SimCLR, 2 views, 2 torch threads):
- the model: contrastkit's ``convnet`` backbone (widths 32-64-128-256, channels-last) + a 2-layer 512-128 projector,
  SGD; the loss is lightly's ``NTXentLoss(temperature=0.1)``;
- lightly's pipeline: PIL images, ``lightly.transforms.SimCLRTransform`` configured like our ``gray`` preset (crop
  scale 0.2-1, flip 0.5, brightness/contrast 0.4 with p 0.8, no saturation/hue/grayscale/blur), ``ToTensor`` +
  normalisation, a torch DataLoader with ``--workers`` worker processes (2 = the setting of the lightly reference figure);
- timed: ``model`` = the step alone on one fixed ready batch; ``end_to_end`` = the loop fed by the DataLoader;
  source images per second, medians over ``--steps`` steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from lightly.loss import NTXentLoss
from lightly.transforms import SimCLRTransform
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from contrastkit.data import load_dataset
from contrastkit.models import build_backbone


class PILDataset(Dataset):
    def __init__(self, images: torch.Tensor, transform) -> None:
        self.images = images.numpy()  # N x 1 x 28 x 28 uint8
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i, 0], mode="L"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_dataset("fashion-mnist", split="train")
    mean, std = data.channel_stats()
    transform = SimCLRTransform(input_size=28, cj_prob=0.8, cj_strength=1.0, cj_bright=0.4, cj_contrast=0.4,
                                cj_sat=0.0, cj_hue=0.0, min_scale=0.2, random_gray_scale=0.0, gaussian_blur=0.0,
                                hf_prob=0.5, normalize={"mean": mean, "std": std})
    loader = DataLoader(PILDataset(data.images, transform), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, drop_last=True, persistent_workers=args.workers > 0)

    backbone, dim = build_backbone("convnet", in_channels=1)
    model = nn.Sequential(backbone, nn.Linear(dim, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                          nn.Linear(512, 128)).to(memory_format=torch.channels_last)
    criterion = NTXentLoss(temperature=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=5e-4)

    def step(x0: torch.Tensor, x1: torch.Tensor) -> None:
        x = torch.cat([x0, x1]).contiguous(memory_format=torch.channels_last)
        z = model(x)
        loss = criterion(z[: len(x0)], z[len(x0):])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    it = iter(loader)
    x0, x1 = next(it)
    t_model = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        step(x0, x1)
        if i >= args.warmup:
            t_model.append(time.perf_counter() - t)

    t_e2e, last = [], None
    for i in range(args.warmup + args.steps):
        try:
            x0, x1 = next(it)
        except StopIteration:
            it = iter(loader)
            x0, x1 = next(it)
        step(x0, x1)
        now = time.perf_counter()
        if last is not None and i > args.warmup:
            t_e2e.append(now - last)
        last = now
    model_ips = args.batch_size / statistics.median(t_model)
    e2e_ips = args.batch_size / statistics.median(t_e2e)
    print(json.dumps({"pipeline": f"lightly SimCLRTransform, {args.workers} DataLoader workers",
                      "backbone": "contrastkit convnet 32-64-128-256", "batch_size": args.batch_size,
                      "steps": args.steps, "torch_threads": torch.get_num_threads(),
                      "model_images_per_sec": round(model_ips, 1), "end_to_end_images_per_sec": round(e2e_ips, 1),
                      "ratio_end_to_end_over_model": round(e2e_ips / model_ips, 3)}))


if __name__ == "__main__":
    main()
