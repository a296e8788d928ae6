"""The ``contrastkit`` command line.

::

    contrastkit train [CONFIG.yaml] [key=value ...] [--resume CKPT|last] [--print-config]
    contrastkit eval knn CHECKPOINT [key=value ...] [--k 200] [--temperature 0.1] [--json]
    contrastkit eval linear CHECKPOINT [key=value ...] [--epochs 100] [--json]
    contrastkit bench throughput [--backbone small_resnet resnet18] [--batch-size 256] [--steps 100] [--json]

Errors caused by input (paths, data, configuration) print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from contrastkit.errors import ContrastkitError


def _print_table(rows: list[tuple[str, str]], title: str) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    print("-" * (width + 12))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>8}")


def cmd_train(args: argparse.Namespace) -> int:
    from contrastkit.config import load_config, to_yaml
    from contrastkit.training.run import config_of_checkpoint, train

    overrides = list(args.overrides)
    config_path = args.config
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        overrides.insert(0, config_path)
        config_path = None
    if args.resume and config_path is None:
        # continue with the checkpoint's own configuration (overrides still apply, e.g. train.epochs=20)
        ckpt = args.resume
        if ckpt == "last":
            from contrastkit.config import load_config as _lc

            run_dir = _lc(None, overrides).train.run_dir
            ckpt = os.path.join(run_dir, "checkpoints", "last.ckpt")
        from contrastkit.config import _apply

        cfg = config_of_checkpoint(ckpt)
        for o in overrides:
            from contrastkit.config import parse_override

            _apply(cfg, *parse_override(o))
        cfg.train.resume = ckpt
        cfg.validate()
    else:
        cfg = load_config(config_path, overrides)
        if args.resume:
            cfg.train.resume = args.resume
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    result = train(cfg)
    m = result.metrics
    if m.get("knn_top1") is None:
        print(f"done: {result.run_dir}")
        return 0
    rows = [(f"{cfg.method.name}+{cfg.method.loss} ({cfg.model.backbone}, {cfg.train.epochs} ep)",
             f"{m['knn_top1']:.2f}")]
    if "random_init_knn" in m:
        rows.append((f"random-init {cfg.model.backbone}", f"{m['random_init_knn']['top1']:.2f}"))
        rows.append(("raw pixels", f"{m['raw_pixels_knn']['top1']:.2f}"))
    if "linear_top1" in m:
        rows.append(("linear probe (trained backbone)", f"{m['linear_top1']:.2f}"))
    _print_table(rows, f"kNN top-1 on {cfg.data.name} {cfg.data.monitor_query_split} "
                       f"(k={cfg.train.knn_k}, T={cfg.train.knn_temperature}, cosine)")
    print(f"\ntraining time {m['train_seconds']:.0f} s, {m['images_per_sec']:.0f} images/s; "
          f"results: {result.run_dir / 'results.json'}")
    return 0


def _eval_sets(ckpt: str, overrides: list[str]) -> tuple[Any, Any, Any, Any]:
    from contrastkit.checkpoint import load_module
    from contrastkit.config import _apply, parse_override
    from contrastkit.training.run import load_monitor_sets

    module = load_module(ckpt)
    cfg = module.cfg
    for o in overrides:
        _apply(cfg, *parse_override(o))
    cfg.validate()
    sets = load_monitor_sets(cfg)
    if sets is None:
        raise ContrastkitError("evaluation needs labelled splits: set data.monitor_bank_split and "
                               "data.monitor_query_split")
    return module, cfg, sets[0], sets[1]


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from contrastkit.evaluation import extract_features, knn_evaluate, linear_probe

    module, cfg, bank, query = _eval_sets(args.checkpoint, args.overrides)
    device = torch.device(args.device)
    module = module.to(device)
    mean, std = module.hparams["mean"], module.hparams["std"]
    fb = extract_features(module.backbone, bank.images, mean, std, cfg.eval.batch_size, device, progress=True)
    fq = extract_features(module.backbone, query.images, mean, std, cfg.eval.batch_size, device, progress=True)
    yb, yq = bank.labels.to(device), query.labels.to(device)
    num_classes = int(max(yb.max(), yq.max())) + 1
    if args.protocol == "knn":
        res: dict[str, Any] = knn_evaluate(fb, yb, fq, yq, num_classes, k=args.k, temperature=args.temperature)
        res.update(protocol="knn", k=args.k, temperature=args.temperature, metric="cosine")
    else:
        res = linear_probe(fb, yb, fq, yq, num_classes, epochs=args.epochs, device=device, progress=True).to_dict()
        res.update(protocol="linear")
    res.update(checkpoint=args.checkpoint, dataset=cfg.data.name, bank_split=cfg.data.monitor_bank_split,
               query_split=cfg.data.monitor_query_split)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.protocol} top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  ({cfg.data.name} "
              f"{cfg.data.monitor_query_split}, bank {cfg.data.monitor_bank_split})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from contrastkit.bench import run_throughput

    records = run_throughput(backbones=args.backbone, batch_size=args.batch_size, steps=args.steps,
                             warmup=args.warmup, device=args.device, methods=args.method, dataset=args.dataset,
                             precision=args.precision, as_json=args.json)
    if args.json:
        for r in records:
            print(json.dumps(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="contrastkit", description="Contrastive self-supervised learning.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain a backbone")
    t.add_argument("config", nargs="?", help="YAML config (presets in configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.5")
    t.add_argument("--resume", help="checkpoint to continue from, or 'last' (RUN_DIR/checkpoints/last.ckpt)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint's backbone")
    e.add_argument("protocol", choices=["knn", "linear"])
    e.add_argument("checkpoint")
    e.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.root=/data/cifar")
    e.add_argument("--k", type=int, default=200)
    e.add_argument("--temperature", type=float, default=0.1)
    e.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    e.add_argument("--device", default="cuda" if _cuda() else "cpu")
    e.add_argument("--json", action="store_true", help="print one JSON record")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    tp = bsub.add_parser("throughput", help="images/s of view generation, model step and end to end")
    tp.add_argument("--backbone", nargs="+", default=["small_resnet", "resnet18"])
    tp.add_argument("--method", nargs="+", default=["simclr"])
    tp.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (1x28x28) or synthetic (3x32x32)")
    tp.add_argument("--batch-size", type=int, default=256)
    tp.add_argument("--steps", type=int, default=100)
    tp.add_argument("--warmup", type=int, default=10)
    tp.add_argument("--device", default="cuda" if _cuda() else "cpu")
    tp.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    tp.add_argument("--json", action="store_true", help="one JSON record per setting")
    tp.set_defaults(func=cmd_bench)
    return p


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ContrastkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is intact; continue with --resume last", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
