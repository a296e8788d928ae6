"""Pictures of a learned representation: a 2-D map of the embedding and a nearest-neighbour retrieval grid.

Both draw with matplotlib's object-oriented API on an Agg canvas (no display, no global pyplot state) and write
the picture atomically (temporary file + ``os.replace``) in the format of the file's extension (PNG, JPEG, PDF,
SVG, ...). Features come from
:class:`~contrastkit.evaluation.offline.CheckpointEvaluator`, so they are extracted once per checkpoint and cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrastkit.errors import ConfigError, ContrastkitError, DataError
from contrastkit.io import atomic_write, writable_file
from contrastkit.models.neighbours import cosine_topk

#: 2-D projection methods of :func:`plot_embedding`.
EMBEDDING_METHODS: tuple[str, ...] = ("tsne", "umap")


def figure_format(out: str | Path) -> str:
    """The image format of ``out``'s extension (``png``, ``jpg``, ``pdf``, ``svg``, ... whatever matplotlib's Agg
    canvas writes). Raises :class:`ConfigError` for any other extension, or none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    fmt = Path(out).suffix.lower().lstrip(".")
    if fmt not in formats:
        raise ConfigError(f"cannot write a picture to {str(out)!r}: its extension must be one of "
                          + ", ".join("." + f for f in sorted(formats)))
    return fmt


def save_figure(fig: Any, out: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib ``Figure`` to ``out`` in the format of its extension (:func:`figure_format`: ``.png``,
    ``.jpg``, ``.pdf``, ``.svg``, ...) atomically (:func:`contrastkit.io.atomic_write`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = figure_format(out)
    writable_file(out, "output")
    FigureCanvasAgg(fig)
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))


def project_2d(features: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """Project N x D features to N x 2.

    Args:
        features: N x D float array (N >= 5).
        method: ``"tsne"`` (default; scikit-learn's ``TSNE`` with PCA initialisation, perplexity
            ``min(30, (N - 1) / 3)``, on L2-normalised features) or ``"umap"`` (umap-learn's ``UMAP`` with
            ``n_neighbors=min(15, N - 1)``, cosine metric; needs ``pip install umap-learn``).
        seed: random state (default 0).
    """
    if method not in EMBEDDING_METHODS:
        raise ConfigError(f"unknown embedding method {method!r}; choose one of {', '.join(EMBEDDING_METHODS)}")
    n = features.shape[0]
    if n < 5:
        raise DataError(f"an embedding map needs at least 5 points, got {n}")
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    if method == "umap":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            raise ContrastkitError("--method umap needs umap-learn, which is not installed: pip install umap-learn, "
                                   "or use --method tsne") from None
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), metric="cosine", random_state=seed)
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ContrastkitError("t-SNE needs scikit-learn: pip install scikit-learn") from None
    tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3.0), init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(x.astype(np.float32)), dtype=np.float32)


def _subset(n: int, size: int, seed: int) -> torch.Tensor:
    if size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def plot_embedding(evaluator: Any, out: str | Path = "embedding.png", *, method: str = "tsne",
                   split: str | None = None, num_points: int = 2000, kind: str = "backbone", seed: int = 0) -> Path:
    """A 2-D map of the embedding of ``split``, one colour per class.

    Args:
        evaluator: a :class:`~contrastkit.evaluation.offline.CheckpointEvaluator`.
        out: picture path (default ``embedding.png``; the extension picks the format, see :func:`figure_format`).
        method: ``tsne`` (default) or ``umap`` (see :func:`project_2d`).
        split: split to draw (default ``None``: ``data.monitor_query_split``, else ``test``).
        num_points: random subset size, seeded (default 2000; the whole split if smaller).
        kind: ``backbone`` (default) or ``projector`` features.
        seed: subset and projection seed (default 0).
    """
    from matplotlib.figure import Figure

    if method not in EMBEDDING_METHODS:
        raise ConfigError(f"unknown embedding method {method!r}; choose one of {', '.join(EMBEDDING_METHODS)}")
    if method == "umap":
        try:
            import umap  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            raise ContrastkitError("--method umap needs umap-learn, which is not installed: pip install umap-learn, "
                                   "or use --method tsne") from None
    split = split or evaluator.cfg.data.monitor_query_split or "test"
    entry = evaluator.features(split, kind)
    idx = _subset(entry.features.shape[0], num_points, seed)
    feats = entry.features[idx.to(entry.features.device)].cpu().numpy()
    xy = project_2d(feats, method, seed)
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.add_subplot(1, 1, 1)
    dot = float(min(24.0, max(3.0, 6000.0 / len(idx))))  # marker area: larger for fewer points
    if entry.labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=dot, c="tab:blue", alpha=0.7, linewidths=0)
    else:
        labels = entry.labels.cpu()[idx].numpy()
        classes = entry.classes or [str(c) for c in range(int(labels.max()) + 1)]
        cmap = _class_colours(len(classes))
        for c in np.unique(labels):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=dot, color=cmap[int(c)], alpha=0.75, linewidths=0,
                       label=classes[int(c)] if int(c) < len(classes) else str(c))
        if len(classes) <= 20:
            ax.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    name = {"tsne": "t-SNE", "umap": "UMAP"}[method]
    ax.set_title(f"{name} of {kind} features: {evaluator.cfg.data.name} {split} ({len(idx)} images)\n"
                 f"{Path(evaluator.checkpoint).name}", fontsize=9)
    return save_figure(fig, out)


def _class_colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _show(ax: Any, image: torch.Tensor) -> None:
    img = image.cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(img[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _frame(ax: Any, colour: str, width: float) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def plot_neighbours(evaluator: Any, out: str | Path = "neighbours.png", *, num_queries: int = 8, k: int = 8,
                    query_split: str | None = None, bank_split: str | None = None, kind: str = "backbone",
                    seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """A retrieval grid: random query images of ``query_split`` (rows) with their ``k`` nearest neighbours (cosine
    similarity of ``kind`` features) in ``bank_split``; wrong-class neighbours get a red frame and a cross.

    Args:
        evaluator: a :class:`~contrastkit.evaluation.offline.CheckpointEvaluator`.
        out: picture path (default ``neighbours.png``; the extension picks the format).
        num_queries: query rows (default 8), a seeded random choice.
        k: neighbours per query (default 8).
        query_split / bank_split: default ``data.monitor_query_split`` / ``data.monitor_bank_split`` (else
            ``test`` / ``train``).
        kind: ``backbone`` (default) or ``projector``.
        seed: query choice seed (default 0).

    Returns:
        ``(path, info)`` with ``info = {"queries": [...], "neighbours": [[...]], "wrong": n, "precision": %}``.
    """
    from matplotlib.figure import Figure

    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ConfigError(f"--queries must be an integer >= 1, got {num_queries!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--k must be an integer >= 1, got {k!r}")
    cfg = evaluator.cfg
    query_split = query_split or cfg.data.monitor_query_split or "test"
    bank_split = bank_split or cfg.data.monitor_bank_split or "train"
    q_entry, b_entry = evaluator.features(query_split, kind), evaluator.features(bank_split, kind)
    q_images, b_images = evaluator.dataset(query_split).images, evaluator.dataset(bank_split).images
    qidx = _subset(q_entry.features.shape[0], num_queries, seed)
    qidx = qidx[torch.randperm(len(qidx), generator=torch.Generator().manual_seed(seed))]
    if k > b_entry.features.shape[0]:
        raise ConfigError(f"k={k} is larger than the bank ({b_entry.features.shape[0]} images); lower --k")
    queries = q_entry.features[qidx.to(q_entry.features.device)].float()  # Q x D
    nbrs = cosine_topk(queries, b_entry.features.float(), k)[1].cpu()  # Q x k
    labelled = q_entry.labels is not None and b_entry.labels is not None
    classes = q_entry.classes or b_entry.classes
    ql = q_entry.labels.cpu() if q_entry.labels is not None else None
    bl = b_entry.labels.cpu() if b_entry.labels is not None else None

    def name(label: int) -> str:
        return classes[label] if classes and label < len(classes) else str(label)

    rows, cols = len(qidx), k + 1
    height = 1.35 * rows + 0.6
    fig = Figure(figsize=(1.25 * cols, height))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1.0 - 0.6 / height, wspace=0.12, hspace=0.45)
    wrong = 0
    for r, qi in enumerate(qidx.tolist()):
        ax = fig.add_subplot(rows, cols, r * cols + 1)
        _show(ax, q_images[qi])
        _frame(ax, "black", 2.5)
        ax.set_title(f"query\n{name(int(ql[qi]))}" if ql is not None else "query", fontsize=7)
        for j, bi in enumerate(nbrs[r].tolist()):
            ax = fig.add_subplot(rows, cols, r * cols + 2 + j)
            _show(ax, b_images[bi])
            if labelled:
                ok = int(bl[bi]) == int(ql[qi])  # type: ignore[index]
                wrong += not ok
                _frame(ax, "tab:green" if ok else "red", 1.5 if ok else 3.0)
                if not ok:
                    ax.text(0.04, 0.96, "\u2717", color="red", fontsize=11, fontweight="bold", va="top",
                            transform=ax.transAxes)
                ax.set_title(name(int(bl[bi])), fontsize=6, color="black" if ok else "red")
    total = rows * k
    prec = 100.0 * (total - wrong) / total if labelled else None
    title = f"{k} nearest neighbours in {cfg.data.name} {bank_split} of {query_split} queries ({kind} features)"
    if prec is not None:
        title += f"; {wrong} of {total} neighbours are of another class (red)"
    fig.suptitle(title, fontsize=8, y=1.0 - 0.15 / height)
    path = save_figure(fig, out)
    info = {"queries": qidx.tolist(), "neighbours": nbrs.tolist(), "wrong": wrong if labelled else None,
            "precision": prec}
    return path, info
