"""Throughput of contrastkit's batched ViewGenerator vs kornia.augmentation and a torchvision v2 per-image loop.

Each implementation turns a uint8 batch into 2 normalised views with the same policy (crop, flip, colour jitter,
grayscale, blur, solarize as the preset sets them). We report *source* images per second: batch size / median
wall time of one call, over ``--iters`` timed iterations after ``--warmup`` untimed ones. The batched
implementations are timed round-robin (one call each per iteration, order rotating) so that load from other
processes on a shared machine hits them alike; the torchvision loop, much slower, runs ``--tv-iters`` iterations.
We also report the minimum and the median process CPU time per call (less sensitive to other processes than
wall time when running single-threaded).

    PYTHONPATH=src python benchmarks/augment_vs_kornia.py            # CPU, 2 threads, batch 256, 2 views
    PYTHONPATH=src python benchmarks/augment_vs_kornia.py --device cuda --threads 0

Configurations: ``fmnist`` (1x28x28, preset "mnist"), ``cifar`` (3x32x32, preset "simclr": jitter, grayscale,
blur p=0.5), ``cifar-byol`` (3x32x32, preset "byol": asymmetric blur 1.0 / 0.1, solarize 0 / 0.2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from contrastkit.augment import ViewGenerator, ViewPolicy, policy_preset

CONFIGS: dict[str, tuple[tuple[int, int, int], str, tuple[float, ...], tuple[float, ...]]] = {
    # name: ((C, H, W), preset, mean, std)
    "fmnist": ((1, 28, 28), "mnist", (0.2860,), (0.3530,)),
    "cifar": ((3, 32, 32), "simclr", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar-byol": ((3, 32, 32), "byol", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def kornia_pipeline(policy: ViewPolicy, channels: int, mean, std) -> torch.nn.Module:
    """The kornia.augmentation equivalent of one view's policy (ops with probability 0 left out, as we skip them)."""
    import kornia.augmentation as K

    size = policy.crop_size
    # cropping_mode="resample" (one batched warp) measured faster than the default "slice" here.
    crop = K.RandomResizedCrop(
        (size, size), scale=policy.crop_scale, ratio=policy.crop_ratio, align_corners=False, cropping_mode="resample"
    )
    ops: list[torch.nn.Module] = [crop]
    if policy.hflip_prob > 0:
        ops.append(K.RandomHorizontalFlip(p=policy.hflip_prob))
    color = channels == 3
    saturation, hue = (policy.saturation, policy.hue) if color else (0.0, 0.0)
    if policy.jitter_prob > 0 and (policy.brightness or policy.contrast or saturation or hue):
        ops.append(K.ColorJitter(policy.brightness, policy.contrast, saturation, hue, p=policy.jitter_prob))
    if color and policy.grayscale_prob > 0:
        ops.append(K.RandomGrayscale(p=policy.grayscale_prob))
    if policy.blur_prob > 0:
        k = policy.effective_blur_kernel_size()
        ops.append(K.RandomGaussianBlur((k, k), policy.blur_sigma, p=policy.blur_prob))
    if policy.solarize_prob > 0:
        t = policy.solarize_threshold
        ops.append(K.RandomSolarize(thresholds=(t, t), additions=(0.0, 0.0), p=policy.solarize_prob))
    ops.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
    return K.AugmentationSequential(*ops)


def torchvision_pipeline(policy: ViewPolicy, channels: int, mean, std) -> Callable[[Tensor], Tensor]:
    """torchvision.transforms.v2 per-image equivalent (uint8 crop/flip, then float colour ops as ours)."""
    from torchvision.transforms import v2

    color = channels == 3
    saturation, hue = (policy.saturation, policy.hue) if color else (0.0, 0.0)
    k = policy.effective_blur_kernel_size()
    ops = [
        v2.RandomResizedCrop(policy.crop_size, scale=policy.crop_scale, ratio=policy.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(policy.hflip_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.ColorJitter(policy.brightness, policy.contrast, saturation, hue)], p=policy.jitter_prob),
    ]
    if color:
        ops.append(v2.RandomGrayscale(policy.grayscale_prob))
    ops += [
        v2.RandomApply([v2.GaussianBlur(k, policy.blur_sigma)], p=policy.blur_prob),
        v2.RandomSolarize(policy.solarize_threshold, p=policy.solarize_prob),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(ops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--views", type=int, default=2, help="views per image (default 2)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations, batched impls (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up iterations (default 3)")
    parser.add_argument("--tv-iters", type=int, default=5, help="timed iterations, torchvision loop (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; 0 leaves it (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--no-torchvision", action="store_true", help="skip the (slow) torchvision loop")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import kornia
    import torchvision

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(
        f"# torch {torch.__version__}, torchvision {torchvision.__version__}, kornia {kornia.__version__}, "
        f"python {platform.python_version()}, device {device}, threads {torch.get_num_threads()}, "
        f"batch {args.batch}, views {args.views}, {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = []
    for name in args.configs:
        (c, h, w), preset, mean, std = CONFIGS[name]
        policies = policy_preset(preset, h, num_views=args.views)
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.batch, c, h, w), generator=g, dtype=torch.uint8).to(device)

        ours = ViewGenerator(policies, mean, std)
        gen = torch.Generator(device=device).manual_seed(0)
        kornia_views = [kornia_pipeline(p, c, mean, std).to(device) for p in policies]

        def run_ours() -> list[Tensor]:
            return ours(images, generator=gen)

        def run_kornia() -> list[Tensor]:
            x = images.float().div_(255.0)
            return [pipe(x) for pipe in kornia_views]

        impls: dict[str, Callable[[], list[Tensor]]] = {"contrastkit": run_ours, "kornia": run_kornia}
        with torch.no_grad():
            for fn in impls.values():  # warm-up and shape check
                for _ in range(args.warmup):
                    out = fn()
                assert [tuple(v.shape) for v in out] == [(args.batch, c, p.crop_size, p.crop_size) for p in policies]
            times: dict[str, list[float]] = {k: [] for k in impls}
            cpu_times: dict[str, list[float]] = {k: [] for k in impls}
            order = list(impls)
            for i in range(args.iters):
                for key in order[i % len(order) :] + order[: i % len(order)]:
                    sync()
                    start, cpu_start = time.perf_counter(), time.process_time()
                    impls[key]()
                    sync()
                    times[key].append(time.perf_counter() - start)
                    cpu_times[key].append(time.process_time() - cpu_start)

            if not args.no_torchvision:
                tv_views = [torchvision_pipeline(p, c, mean, std) for p in policies]
                cpu_images = images.cpu()

                def run_torchvision() -> list[Tensor]:
                    return [torch.stack([pipe(img) for img in cpu_images]) for pipe in tv_views]

                run_torchvision()
                key = "torchvision v2 loop"
                times[key], cpu_times[key] = [], []
                for _ in range(args.tv_iters):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    run_torchvision()
                    times[key].append(time.perf_counter() - start)
                    cpu_times[key].append(time.process_time() - cpu_start)

        for key, ts in times.items():
            med = statistics.median(ts)
            row = {
                "config": name,
                "shape": f"{c}x{h}x{w}",
                "preset": preset,
                "impl": key,
                "median_ms": 1e3 * med,
                "min_ms": 1e3 * min(ts),
                "max_ms": 1e3 * max(ts),
                "cpu_ms": 1e3 * statistics.median(cpu_times[key]),
                "images_per_s": args.batch / med,
                "iters": len(ts),
            }
            results.append(row)
            print(
                f"{name:11s} {c}x{h}x{w} {preset:7s} {key:20s} median {row['median_ms']:8.2f} ms "
                f"(min {row['min_ms']:7.2f}, max {row['max_ms']:8.2f}, cpu {row['cpu_ms']:8.2f})  "
                f"{row['images_per_s']:9.0f} images/s",
                flush=True,
            )
    print(
        "\n| config | input | preset | implementation | median ms / batch | min ms | CPU ms (median) "
        "| source images/s (median) |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['config']} | {r['shape']} | {r['preset']} | {r['impl']} | {r['median_ms']:.1f} "
            f"| {r['min_ms']:.1f} | {r['cpu_ms']:.1f} | {r['images_per_s']:,.0f} |"
        )
    print(f"\n# load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())} (1, 5, 15 min)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
