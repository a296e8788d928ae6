"""The ``contrastkit`` command line.

::

    contrastkit train [CONFIG.yaml] [key=value ...] [--resume CKPT|last] [--print-config]
    contrastkit eval knn CHECKPOINT [key=value ...] [--k 200] [--temperature 0.1] [--grid] [--features ...] [--json]
    contrastkit eval linear CHECKPOINT [key=value ...] [--epochs 100] [--augmented] [--features ...] [--json]
    contrastkit study STUDY.yaml [--jobs N] [--dry-run] [--out STUDY_DIR]
    contrastkit report RUN_DIR|STUDY_DIR [...] [--out report]
    contrastkit plot embedding CHECKPOINT [--method tsne|umap] [--out PNG]
    contrastkit plot neighbours CHECKPOINT [--out PNG] [--queries 8] [--k 8]
    contrastkit export CHECKPOINT [--out backbone.pt]
    contrastkit embed CHECKPOINT DATASET [--split test] [--root PATH] [--out features.npy|.npz]
    contrastkit bench throughput [--backbone small_resnet resnet18] [--batch-size 256] [--steps 100] [--json]
                                 [--plugin ascl]   (each setting without and with the plug-in, side by side)
    contrastkit plugins          the host x plug-in compatibility matrix

Errors caused by input (paths, data, configuration) print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from contrastkit.errors import ContrastkitError


def _print_table(rows: list[tuple[str, ...]], title: str, header: tuple[str, ...] = ()) -> None:
    """Rows of a name and right-aligned values under ``title`` (and a ``header`` row when given)."""
    lines = [header, *rows] if header else rows
    width = max(len(r[0]) for r in lines)
    cols = max(len(r) for r in lines) - 1
    print(f"\n{title}")
    if header:
        print(f"{header[0]:<{width}}" + "".join(f"  {h:>9}" for h in header[1:]))
    print("-" * (width + 11 * cols))
    for name, *values in rows:
        print(f"{name:<{width}}" + "".join(f"  {v:>9}" for v in values))


def _what_ran(cfg: Any, metrics: dict[str, Any]) -> str:
    """How much training ran: ``"20 ep"``, or ``"3 steps = 0.15 of 20 ep, train.max_steps"`` when stopped early."""
    steps, per_epoch = metrics.get("steps"), metrics.get("steps_per_epoch")
    if not steps or not per_epoch or steps >= per_epoch * cfg.train.epochs:
        return f"{cfg.train.epochs} ep"
    return f"{steps} steps = {steps / per_epoch:.2f} of {cfg.train.epochs} ep, train.max_steps"


def cmd_train(args: argparse.Namespace) -> int:
    from contrastkit.config import load_config, to_yaml
    from contrastkit.methods import loss_name
    from contrastkit.training.run import resume_config, train

    overrides = list(args.overrides)
    config_path = args.config
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        overrides.insert(0, config_path)
        config_path = None
    if args.resume and config_path is None:
        # continue with the checkpoint's own configuration (overrides still apply, e.g. train.epochs=20); the run
        # directory comes from the command line or the checkpoint's location, never from inside the checkpoint
        ckpt = args.resume
        if ckpt == "last":
            ckpt = os.path.join(load_config(None, overrides).train.run_dir, "checkpoints", "last.ckpt")
            if not os.path.isfile(ckpt):
                raise ContrastkitError(f"--resume last: no checkpoint {ckpt!r}; give the run's config file or "
                                       "train.run_dir=RUN_DIR, or the checkpoint's path")
        cfg = resume_config(ckpt, overrides)
    else:
        cfg = load_config(config_path, overrides)
        if args.resume:
            cfg.train.resume = args.resume
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    result = train(cfg)
    m = result.metrics
    ran = _what_ran(cfg, m)
    if m.get("knn_top1") is None and "linear_top1" not in m:
        print(f"done ({ran}): {result.run_dir}")
        return 0
    final = "knn_top1_test" in m or (m.get("knn_top1") is None and m.get("linear_top1_test") is not None)
    split = cfg.data.test_split if final else cfg.data.monitor_query_split  # the test split once, at the end
    top1 = m.get("knn_top1_test") if final else m.get("knn_top1")
    run = f"{cfg.method.name}+{loss_name(cfg.method)} ({cfg.model.backbone}, {ran})"
    linear = m.get("linear_top1_test" if final else "linear_top1_val")

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def probe(key: str) -> str:  # a baseline's linear probe: test top-1 (final) or its validation top-1
        res = m.get(key)
        return cell(None if res is None else res["top1"] if final else res["val_top1"])

    rows: list[tuple[str, ...]] = [(run, cell(top1), cell(linear))]
    if "random_init_knn" in m and m.get("final_split") == split:
        rows.append((f"random-init {cfg.model.backbone}", cell(m["random_init_knn"]["top1"]),
                     probe("random_init_linear")))
        rows.append(("raw pixels (normalised)", cell(m["raw_pixels_knn"]["top1"]), probe("raw_pixels_linear")))
        rows.append(("raw pixels (in [0, 1])", cell(m["raw_pixels_unnormalised_knn"]["top1"]),
                     probe("raw_pixels_linear")))
    title = (f"top-1 on {cfg.data.name} {split} (kNN: k={m.get('knn_k', cfg.train.knn_k)}, "
             f"T={cfg.train.knn_temperature}, cosine, bank {cfg.data.monitor_bank_split}"
             + ("; linear probe chosen on " + str(cfg.data.monitor_query_split) if linear is not None else "") + ")")
    if top1 is None:
        title = f"linear probe top-1 on {cfg.data.name} {split}"
    shown = (top1 is not None, linear is not None)  # the kNN and linear columns this run has
    rows = [(r[0], *(v for v, keep in zip(r[1:], shown) if keep)) for r in rows]
    header = ("", "kNN top-1", "linear") if all(shown) else ()
    _print_table(rows, title, header)
    if "knn_top1_val" in m and split != cfg.data.monitor_query_split:
        print(f"(validation split {cfg.data.monitor_query_split}: kNN top-1 {m['knn_top1_val']:.2f}"
              + (f", linear {m['linear_top1_val']:.2f}" if m.get("linear_top1_val") is not None else "") + ")")
    print(f"\ntraining time {m['train_seconds']:.0f} s, {m['images_per_sec']:.0f} images/s; "
          f"results: {result.run_dir / 'results.json'}")
    return 0


def _evaluator(args: argparse.Namespace, overrides: list[str] | None = None) -> Any:
    from contrastkit.evaluation.offline import CheckpointEvaluator

    return CheckpointEvaluator(args.checkpoint, overrides or [], device=args.device,
                               batch_size=getattr(args, "batch_size", None), cache=not args.no_cache, progress=True)


def cmd_eval(args: argparse.Namespace) -> int:
    ev = _evaluator(args, args.overrides)
    kind = args.features
    if args.protocol == "knn" and args.grid:
        res = ev.knn_grid(ks=args.ks, temperatures=args.temperatures, kind=kind)
    elif args.protocol == "knn":
        res = ev.knn(k=args.k, temperature=args.temperature, kind=kind)
    else:
        res = ev.linear(epochs=args.epochs, augmented=args.augmented, passes=args.aug_passes, kind=kind)
    ev.save_result(res)
    cfg = ev.cfg
    if not args.json and res["protocol"] != "knn-grid" and not ev.own_protocol(res):
        print("note: not the run's own protocol (its dataset, backbone features, standard settings): stored as "
              "another evaluation, which `contrastkit report` lists with its settings", file=sys.stderr)
    where = f"({cfg.data.name} {res['query_split']}, bank {res['bank_split']}, {kind} features)"
    if args.json:
        print(json.dumps(res))
    elif res["protocol"] == "knn-grid":
        note = ("the best row is chosen on the test split: report it as such" if res["query_split"] == "test" else
                f"choose on {res['query_split']}, then evaluate only that setting on test")
        print(f"\nkNN grid {where}; {note}")
        print(f"{'metric':<10} {'k':>5} {'T':>6} {'top-1':>7} {'top-5':>7}")
        for r in res["grid"]:
            t = "-" if r["temperature"] is None else f"{r['temperature']:g}"
            print(f"{r['metric']:<10} {r['k']:>5} {t:>6} {r['top1']:>7.2f} {r['top5']:>7.2f}")
    else:
        extra = ""
        if res["protocol"] == "linear":
            extra = f"; lr {res['lr']:g}, weight decay {res['weight_decay']:g}" + (
                f", {res['augmented']['passes']} augmented passes" if res["augmented"] else "")
        print(f"{args.protocol} top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  ({cfg.data.name} "
              f"{res['query_split']}, bank {res['bank_split']}, {kind} features{extra})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from contrastkit.report import build_report
    from contrastkit.study import is_study_dir, write_summary

    studies = [d for d in args.run_dirs if is_study_dir(d)]
    for study_dir in studies:  # a study folder: its summary is (re)written in place
        write_summary(study_dir)
        print(f"wrote {os.path.join(study_dir, 'summary.md')} (+ summary.json and PNG plots)")
    runs = [d for d in args.run_dirs if d not in studies]
    if runs:
        md = build_report(runs, args.out)
        print(f"wrote {md} (+ PNG plots in {md.parent})")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from contrastkit.study import load_study, run_study, study_commands

    study = load_study(args.study, out=args.out)
    if args.dry_run:
        for line in study_commands(study):
            print(line)
        return 0
    summary = run_study(study, jobs=args.jobs)
    print(f"wrote {study.out / 'summary.md'} (+ summary.json and PNG plots)")
    if summary["failed"]:
        print(f"error: {len(summary['failed'])} run(s) failed ({', '.join(summary['failed'])}); see their output "
              f"above or in {study.out / 'logs'}", file=sys.stderr)
        return 1
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from contrastkit.evaluation.plots import figure_format, plot_embedding, plot_neighbours
    from contrastkit.io import writable_file

    out = args.out or (f"embedding-{args.method}.png" if args.plot == "embedding" else "neighbours.png")
    figure_format(out)  # an unknown extension or an unwritable path is refused before any work
    writable_file(out, "--out")
    ev = _evaluator(args)
    if args.plot == "embedding":
        path = plot_embedding(ev, out, method=args.method, split=args.split, num_points=args.num_points,
                              kind=args.features, seed=args.seed)
        print(f"wrote {path}")
    else:
        path, info = plot_neighbours(ev, out, num_queries=args.queries, k=args.k,
                                     query_split=args.split, bank_split=args.bank_split, kind=args.features,
                                     seed=args.seed)
        note = "" if info["precision"] is None else f" ({info['precision']:.1f}% of the neighbours share the class)"
        print(f"wrote {path}{note}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from contrastkit.export import export_backbone
    from contrastkit.io import writable_file

    writable_file(args.out, "--out")
    weights, side = export_backbone(args.checkpoint, args.out)
    print(f"wrote {weights} (state dict) and {side} (architecture, normalisation); "
          "load with contrastkit.load_backbone() or see the sidecar's 'torchvision' entry")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from contrastkit.errors import DataError
    from contrastkit.export import embed
    from contrastkit.io import writable_file

    writable_file(args.out, "--out")
    try:
        res = embed(args.checkpoint, args.dataset, split=args.split, root=args.root, out=args.out,
                    kind=args.features, image_size=args.image_size, device=args.device, batch_size=args.batch_size,
                    cache=not args.no_cache, progress=True)
    except DataError as e:  # the loaders name the config key data.root; here the dataset folder is --root
        raise DataError(str(e).replace("data.root=PATH", "--root PATH").replace("data.root", "--root")) from None
    n, d = res["shape"]
    labels = f", labels in {res['labels']}" if res["labels"] is not None else " (unlabelled split: no labels)"
    print(f"wrote {n} x {d} float32 features to {res['features']}{labels}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from contrastkit.bench import run_throughput

    records = run_throughput(backbones=args.backbone, batch_size=args.batch_size, steps=args.steps,
                             warmup=args.warmup, device=args.device, methods=args.method, dataset=args.dataset,
                             precision=args.precision, as_json=args.json, overrides=args.overrides,
                             plugins=args.plugins, repeats=args.repeats)
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
    e.add_argument("--grid", action="store_true", help="knn: the grid over --ks x --temperatures x cosine/euclidean")
    e.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100, 200], help="knn --grid: neighbour counts")
    e.add_argument("--temperatures", type=float, nargs="+", default=[0.05, 0.07, 0.1, 0.2, 0.5],
                   help="knn --grid: temperatures (cosine only)")
    e.add_argument("--features", choices=["backbone", "projector"], default="backbone",
                   help="evaluate backbone features (default) or projector outputs")
    e.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    e.add_argument("--augmented", action="store_true",
                   help="linear: train on crop+flip augmented features (--aug-passes distinct passes, reused)")
    e.add_argument("--aug-passes", type=int, default=4, help="linear --augmented: distinct augmented passes")
    _add_common_eval_args(e)
    e.add_argument("--json", action="store_true", help="print one JSON record")
    e.set_defaults(func=cmd_eval)

    st = sub.add_parser("study", help="run arms x seeds at an equal budget; summary with paired 95%% CIs")
    st.add_argument("study", help="study YAML file (see studies/example.yaml)")
    st.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses; one GPU each where present)")
    st.add_argument("--dry-run", action="store_true", help="print the contrastkit train commands; run nothing")
    st.add_argument("--out", help="study folder (default: the file's 'out', else runs/studies/STEM)")
    st.set_defaults(func=cmd_study)

    r = sub.add_parser("report", help="compare runs: Markdown table + PNG training curves; or summarise studies")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or study folders (summary.md)")
    r.add_argument("--out", default="report", help="output folder (default ./report)")
    r.set_defaults(func=cmd_report)

    pl = sub.add_parser("plot", help="pictures of a checkpoint's representation")
    psub = pl.add_subparsers(dest="plot", required=True)
    pe = psub.add_parser("embedding", help="2-D map (t-SNE or UMAP) of the embedding, coloured by class")
    pe.add_argument("checkpoint")
    pe.add_argument("--method", choices=["tsne", "umap"], default="tsne")
    pe.add_argument("--out", help="picture path; its extension (.png, .jpg, .pdf, .svg, ...) picks the format "
                                  "(default embedding-METHOD.png)")
    pe.add_argument("--split", help="split to draw (default data.monitor_query_split)")
    pe.add_argument("--num-points", type=int, default=2000, help="random subset size (default 2000)")
    pe.add_argument("--features", choices=["backbone", "projector"], default="backbone")
    pe.add_argument("--seed", type=int, default=0)
    _add_common_eval_args(pe)
    pe.set_defaults(func=cmd_plot)
    pn = psub.add_parser("neighbours", aliases=["neighbors"], help="nearest-neighbour retrieval grid")
    pn.add_argument("checkpoint")
    pn.add_argument("--out", help="picture path; its extension (.png, .jpg, .pdf, .svg, ...) picks the format "
                                  "(default neighbours.png)")
    pn.add_argument("--queries", type=int, default=8, help="query images (rows), default 8")
    pn.add_argument("--k", type=int, default=8, help="neighbours per query, default 8")
    pn.add_argument("--split", help="query split (default data.monitor_query_split)")
    pn.add_argument("--bank-split", help="neighbour split (default data.monitor_bank_split)")
    pn.add_argument("--features", choices=["backbone", "projector"], default="backbone")
    pn.add_argument("--seed", type=int, default=0)
    _add_common_eval_args(pn)
    pn.set_defaults(func=cmd_plot, plot="neighbours")

    x = sub.add_parser("export", help="write the backbone as a plain state dict + JSON sidecar")
    x.add_argument("checkpoint")
    x.add_argument("--out", default="backbone.pt", help="weights file (default backbone.pt; sidecar backbone.json)")
    x.set_defaults(func=cmd_export)

    em = sub.add_parser("embed", help="write the features of a dataset split (N x D float32 .npy/.npz)")
    em.add_argument("checkpoint")
    em.add_argument("dataset", help="dataset name, e.g. cifar10, fashion-mnist, imagefolder, synthetic")
    em.add_argument("--split", default="test")
    em.add_argument("--root", help="dataset folder (default: the checkpoint's data.root for its own dataset)")
    em.add_argument("--out", default="features.npy",
                    help="features.npy (+ features.labels.npy) or a .npz with 'features' and 'labels'")
    em.add_argument("--features", choices=["backbone", "projector"], default="backbone")
    em.add_argument("--image-size", type=int, help="imagefolder decode size (default: the model's input size)")
    _add_common_eval_args(em)
    em.set_defaults(func=cmd_embed)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    tp = bsub.add_parser("throughput", help="images/s of view generation, model step and end to end")
    tp.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.widths=[16,32,64,128]")
    tp.add_argument("--backbone", nargs="+", default=["small_resnet", "resnet18"])
    tp.add_argument("--method", nargs="+", default=["simclr"])
    tp.add_argument("--dataset", choices=["fashion-mnist", "synthetic"],
                    help="fashion-mnist (1x28x28) or synthetic (3x32x32), for every backbone (default: fashion-mnist "
                         "for small_resnet/convnet, synthetic for torchvision ResNets)")
    tp.add_argument("--batch-size", type=int, default=256)
    tp.add_argument("--steps", type=int, default=100)
    tp.add_argument("--warmup", type=int, default=10)
    tp.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    tp.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    tp.add_argument("--json", action="store_true", help="one JSON record per setting")
    tp.add_argument("--plugin", "--plugins", action="append", default=[], metavar="NAME", dest="plugins",
                    help="also run each setting with this plug-in on (repeatable; options: plugins.NAME.KEY=V "
                         "overrides, which apply to the plug-in runs only)")
    tp.add_argument("--repeats", type=int, default=1,
                    help="this many rounds, each running every method, backbone and variant once (alternating); "
                         "prints each variant's median and its ratio to the host (default 1)")
    tp.set_defaults(func=cmd_bench)

    pg = sub.add_parser("plugins", help="print the host x plug-in compatibility matrix")
    pg.set_defaults(func=cmd_plugins)
    return p


def cmd_plugins(args: argparse.Namespace) -> int:
    from contrastkit.plugins import plugin_matrix

    print("host (method.name + method.loss) x plug-in (plugins.NAME): yes = compatible, - = refused")
    print(plugin_matrix())
    return 0


def _add_common_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="evaluation device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="feature extraction batch (default eval.batch_size)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the feature cache CHECKPOINT.features/")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]  # key=value after an option, e.g. --resume last train.epochs=5
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except ContrastkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training raises RunInterrupted, whose message names the run to resume
        print(str(e) or "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
