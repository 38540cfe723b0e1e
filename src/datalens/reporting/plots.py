"""Figures. Each function draws one figure from arrays and saves it; notebooks call them."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")

DPI = 110
REPORT_WIDTH_IN = 10.0  # the report's column (1100 px) at DPI: wider figures are shown scaled down
MIN_SHOWN_PT = 7.0  # the smallest text a figure may show at that width (tests check every multi-panel figure)
MAX_COLUMNS = 3  # panels per row of a multi-panel figure, so its text stays readable


def shown_font_size(fig) -> float:
    """The smallest font (points) of any visible text in ``fig`` as the report shows it: figures
    wider than the report's column are scaled down to it."""
    scale = min(1.0, REPORT_WIDTH_IN / fig.get_figwidth())
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) * scale if sizes else float("inf")


def _panels(n: int, width: float, height: float, **kwargs):
    """A figure of ``n`` panels, at most :data:`MAX_COLUMNS` a row, unused cells hidden; returns
    (fig, the n axes in order)."""
    cols = min(n, MAX_COLUMNS)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kwargs)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig, path: Path, caption: str = "", top: float = 1.0) -> Path:
    """Lay out (below ``top``, leaving room for a figure legend above), add ``caption`` under the
    axes when given, write and close."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0.08 if caption else 0, 1, top))
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=8.5, wrap=True)
    # the smallest text as the report shows it, kept in the PNG so a test can check every figure drawn
    fig.savefig(path, dpi=DPI, metadata={"Shown font pt": f"{shown_font_size(fig):.2f}"})
    plt.close(fig)
    return path


def accuracy_histogram(test_accuracy: np.ndarray, path: Path) -> Path:
    """test_accuracy: (N,) per-model test accuracy."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sns.histplot(test_accuracy, bins=30, ax=ax)
    ax.set(xlabel="test accuracy", ylabel="models", title=f"{len(test_accuracy)} subset models")
    return _save(fig, path)


def margin_distributions(margins: np.ndarray, targets: np.ndarray, path: Path) -> Path:
    """margins: (N, t) test margins; draws the distribution over models for a few targets."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for t in targets:
        sns.kdeplot(margins[:, t], ax=ax, label=f"test #{t}", fill=True, alpha=0.2)
    ax.set(xlabel="margin (logit_y - logsumexp others)", ylabel="density", title="margin across subset models")
    ax.legend(fontsize=8)
    return _save(fig, path)


def with_without(margin_in: np.ndarray, margin_out: np.ndarray, target: int, train_index: int, path: Path) -> Path:
    """Mean margin of one target over models that contain vs lack one training example."""
    fig, ax = plt.subplots(figsize=(4, 3.5))
    means = [margin_in.mean(), margin_out.mean()]
    errs = [margin_in.std(ddof=1) / np.sqrt(len(margin_in)), margin_out.std(ddof=1) / np.sqrt(len(margin_out))]
    ax.bar(["with", "without"], means, yerr=errs, capsize=6, color=["tab:blue", "tab:orange"])
    ax.set(ylabel="mean margin (± s.e.)", title=f"test #{target}, train #{train_index}")
    return _save(fig, path)


def scatter_predicted_actual(predicted: np.ndarray, actual: np.ndarray, path: Path, title: str = "", xlabel: str = "predicted", ylabel: str = "actual") -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(predicted, actual, s=4, alpha=0.3)
    lo, hi = np.nanmin([predicted.min(), actual.min()]), np.nanmax([predicted.max(), actual.max()])
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return _save(fig, path)


def image_grid(images: list[np.ndarray], titles: list[str], path: Path, ncols: int, size: float = 1.3) -> Path:
    nrows = -(-len(images) // ncols)
    size = min(size, REPORT_WIDTH_IN / ncols)  # never wider than the report, so the titles stay readable
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * 1.15), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None)
        ax.set_title(title, fontsize=7)
    return _save(fig, path)


def line(xs, ys: dict[str, list], path: Path, xlabel: str, ylabel: str, title: str = "", logx: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, y in ys.items():
        ax.plot(xs, y, marker="o", label=label)
    if logx:  # ticks at the values themselves, written plainly (not 4 x 10^0)
        ax.set_xscale("log")
        ax.set_xticks(list(xs), [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def histogram(values: np.ndarray, path: Path, xlabel: str, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sns.histplot(values, bins=40, ax=ax)
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    return _save(fig, path)


def top_attributed(scores: np.ndarray, targets, images_test, images_train, labels_test, labels_train, path: Path, k: int = 5,
                   target_ids=None) -> Path:
    """Per target row: the test image, then its k most positive and k most negative training examples.
    scores: (n_train, n_test); ``target_ids`` (n_test,): the number each column is shown by
    (default its index)."""
    imgs, titles = [], []
    for t in targets:
        shown = t if target_ids is None else target_ids[t]
        imgs.append(images_test[t]); titles.append(f"test #{shown} (y={labels_test[t]})")
        for i in np.argsort(-scores[:, t])[:k]:
            imgs.append(images_train[i]); titles.append(f"+{scores[i, t]:.2f} y={labels_train[i]}")
        for i in np.argsort(scores[:, t])[:k]:
            imgs.append(images_train[i]); titles.append(f"{scores[i, t]:.2f} y={labels_train[i]}")
    return image_grid(imgs, titles, path, ncols=1 + 2 * k)


def lds_vs_compute(records: list[dict], path: Path, trak_proj_dim: int | None = None, caption: str = "") -> Path:
    """LDS of every method against charged wall seconds and charged trained models (log x);
    ``caption`` (the accounting rules) is printed under the axes."""
    fig, axes = plt.subplots(1, 2, figsize=(REPORT_WIDTH_IN, 4.6), sharey=True)
    methods = sorted({r["method"] for r in records})
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    for ax, key, label in ((axes[0], "seconds", "charged compute (wall seconds on this machine)"),
                           (axes[1], "models", "charged trained models")):
        for m in methods:
            rs = [r for r in records if r["method"] == m and (m != "trak" or trak_proj_dim is None or r.get("proj_dim") == trak_proj_dim)]
            rs.sort(key=lambda r: r["models"])  # connect budgets in order (fit time need not grow with models)
            restricted = rs and rs[0].get("params") not in (None, "all")  # a method run on some layers says which
            ax.plot([r[key] for r in rs], [r["lds"] for r in rs], marker="o", color=palette[m],
                    label=f"{m} ({rs[0]['params']})" if restricted else m)
        ax.set_xscale("log")
        ax.set(xlabel=label)
    axes[0].set_ylabel("LDS (held-out models)")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("Linear datamodeling score vs compute")
    return _save(fig, path, caption)


def variance_scatter(directions: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, label_a: str = "A",
                     label_b: str = "B") -> Path:
    """Explained variance of each distinguishing direction under algorithm A (x) and B (y), one
    series per residual (e.g. "A minus B": (variance_a (k,), variance_b (k,))), with the y = x line."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    top = max(max(a.max(), b.max()) for a, b in directions.values()) * 1.1
    for name, (a, b) in directions.items():
        ax.scatter(a, b, label=name, s=30)
        for i, (xa, yb) in enumerate(zip(a, b)):
            ax.annotate(str(i + 1), (xa, yb), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set(xlim=(0, top), ylim=(0, top), xlabel=f"explained variance under {label_a}",
           ylabel=f"explained variance under {label_b}", title="distinguishing directions")
    ax.legend(fontsize=8)
    return _save(fig, path)


def dose_response(xs: list[float], series: dict[str, list[dict]], path: Path, xlabel: str, ylabel: str, title: str = "") -> Path:
    """Mean effect with its 95% interval (records with mean, low, high) against intensity, one line per algorithm."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, recs in series.items():
        mean = [r["mean"] for r in recs]
        ax.errorbar(xs, mean, yerr=[[m - r["low"] for m, r in zip(mean, recs)], [r["high"] - m for m, r in zip(mean, recs)]],
                    marker="o", capsize=4, label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def roc_curve(scores: np.ndarray, truth: np.ndarray, path: Path, title: str = "") -> Path:
    """ROC of ``scores`` (n,) against boolean ``truth`` (n,)."""
    order = np.argsort(-scores)
    t = truth[order].astype(float)
    tpr = np.concatenate([[0], np.cumsum(t) / max(t.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(1 - t) / max((1 - t).sum(), 1)])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    return _save(fig, path)


def bars(values: dict[str, float], path: Path, ylabel: str, title: str = "", errors: dict[str, float] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    names = list(values)
    ax.bar(names, [values[n] for n in names], yerr=[errors[n] for n in names] if errors else None, capsize=4)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


def histograms(values: dict[str, np.ndarray], path: Path, xlabel: str, title: str = "") -> Path:
    """Overlaid histograms, one per named sample."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, v in values.items():
        sns.histplot(v, bins=40, ax=ax, label=f"{name} (median {np.median(v):.2f})", element="step", fill=False)
    ax.set(xlabel=xlabel, ylabel="targets", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def klom_vs_compute(curves: dict[str, dict[str, list[tuple[float, float]]]], floors: dict[str, float],
                    ceilings: dict[str, float], direct: dict[str, float], path: Path, caption: str = "") -> Path:
    """A panel per forget set: each method's forget-set KLoM (95th percentile) at its chosen
    learning rate per budget against fine-tuning compute (epoch-equivalents, log x); DM-direct
    (no fine-tuning) as a star at the left edge; the floor (independent oracles) and ceiling
    (do nothing) as lines. curves[set][method] = [(compute, klom), ...]."""
    names = list(curves)
    fig, axes = _panels(len(names), 3.4, 3.6, sharey=True)
    methods = sorted({m for c in curves.values() for m in c})
    palette = dict(zip(methods + ["dm_direct"], sns.color_palette("tab10", len(methods) + 1)))
    xs = [x for c in curves.values() for pts in c.values() for x, _ in pts if x > 0]
    left = min(xs) / 3 if xs else 0.01
    for ax, name in zip(axes, names):
        for m in methods:
            pts = curves[name].get(m, [])
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=m, color=palette[m])
        ax.scatter([left], [direct[name]], marker="*", s=120, color=palette["dm_direct"], label="dm_direct", zorder=3)
        ax.axhline(floors[name], color="k", ls=":", label="floor (oracles)")
        ax.axhline(ceilings[name], color="grey", ls="--", label="ceiling (do nothing)")
        ax.set_xscale("log")
        ax.set(title=name, xlabel="fine-tuning epoch-equivalents")
    axes[0].set_ylabel("KLoM, forget set, 95th pct")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    return _save(fig, path, caption, top=0.9)


def klom_distributions(values: dict[str, dict[str, np.ndarray]], path: Path, caption: str = "") -> Path:
    """Box plots of per-example KLoM per split (a panel each), one box per method:
    values[method][split] = (examples,)."""
    splits = list(next(iter(values.values())))
    fig, axes = _panels(len(splits), 3.3, 3.9, sharey=True)
    for ax, split in zip(axes, splits):
        names = list(values)
        ax.boxplot([values[m][split] for m in names], whis=(5, 95), showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=60, fontsize=8)
        ax.set(title=split)
    axes[0].set_ylabel("KLoM per example (whiskers 5-95%)")
    return _save(fig, path, caption)


def margin_histograms(oracle: np.ndarray, unlearned: dict[str, np.ndarray], titles: list[str], path: Path,
                      caption: str = "") -> Path:
    """For a few forget examples (a panel each), histograms over models of the oracles' margins
    (N, k) and of each method's unlearned margins (N, k)."""
    k = oracle.shape[1]
    fig, axes = _panels(k, 3.3, 3.2)
    for j, ax in enumerate(axes):
        sample = np.concatenate([oracle[:, j]] + [v[:, j] for v in unlearned.values()])
        bins = np.linspace(sample.min(), sample.max(), 25)
        ax.hist(oracle[:, j], bins=bins, color="k", alpha=0.35, label="oracles")
        for name, v in unlearned.items():
            ax.hist(v[:, j], bins=bins, histtype="step", lw=1.4, label=name)
        ax.set(title=titles[j], xlabel="margin")
    axes[0].set_ylabel("models")
    axes[-1].legend(fontsize=8)
    return _save(fig, path, caption)


def grouped_bars(values: dict[str, dict[str, float]], path: Path, ylabel: str, title: str = "", caption: str = "") -> Path:
    """values[group][series]: one cluster of bars per group (e.g. split), one bar per series (e.g. method)."""
    groups = list(values)
    series = list(next(iter(values.values())))
    fig, ax = plt.subplots(figsize=(min(REPORT_WIDTH_IN, max(6.0, 0.45 * len(series) * len(groups))), 4.0))
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        ax.bar(np.arange(len(groups)) + i * width, [values[g][s] for g in groups], width, label=s)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    lo = min(v for g in values.values() for v in g.values())
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set(ylabel=ylabel, title=title)
    fig.legend(*ax.get_legend_handles_labels(), loc="upper center", ncol=min(len(series), 6), fontsize=8, frameon=False)
    return _save(fig, path, caption, top=0.9)


def ranked_texts(query: str, columns: dict[str, list[tuple[str, float, bool]]], path: Path, caption: str = "",
                 mark: str = "true") -> Path:
    """A query and, one panel per method, its top-ranked training texts in order (text, score,
    whether it is marked: ground truth, or what ``mark`` names); marked texts carry ``[mark]`` and
    are drawn in green."""
    rows_per = max(len(v) for v in columns.values())
    fig, axes = plt.subplots(len(columns), 1, figsize=(8.0, len(columns) * (0.28 * rows_per + 0.5)), squeeze=False)
    for ax, (method, rows) in zip(axes[:, 0], columns.items()):
        ax.axis("off")
        ax.set_title(method, fontsize=10, loc="left")
        for r, (text, score, truth) in enumerate(rows):
            ax.text(0.0, 1.0 - (r + 0.5) / len(rows), f"{r + 1}. {f'[{mark}] ' if truth else ''}{text}  ({score:+.3g})", fontsize=8.5,
                    color="tab:green" if truth else "0.2", fontweight="bold" if truth else "normal", va="center",
                    transform=ax.transAxes)
    fig.suptitle(f"query: {query}", fontsize=10)
    return _save(fig, path, caption, top=0.92)
