"""The report's figures (matplotlib, Agg backend), each written under a temporary name and renamed. A figure
whose stages have not run is skipped (its function returns None)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from common.figures import pyplot, save_figure
from common.files import write_bytes_atomic
from pipeline.claims import PAPER_FIGURE3, Results, paper_percent

# Ilyas Figure 2's training sets (stage: label); the paper's clean and L2 0.25 accuracies come from the claims
# table (Figure 2 marks the L2 0.25 number only for the first four).
FIGURE2 = {"standard": "D", "adversarial_l2": "D adv.", "d_robust": "D_R", "d_nonrobust": "D_NR", "d_rand": "D_rand",
           "d_det": "D_det"}
FIGURE2_ROBUST_MARKED = ("standard", "adversarial_l2", "d_robust", "d_nonrobust")


def figure2_paper(stage: str) -> tuple[float | None, float | None]:
    return (paper_percent(f"{stage}.clean"),
            paper_percent(f"{stage}.l2_0.25") if stage in FIGURE2_ROBUST_MARKED else None)


def save(figure, path: Path) -> Path:
    return save_figure(figure, path, dpi=110, bbox_inches="tight")


def figure2(results: Results, path: Path) -> Path | None:
    """Bars: clean and L2 eps 0.25 accuracy of a model trained on each training set (paper values as marks)."""
    bars = [(stage, label, figure2_paper(stage), results.metric(stage, "test/acc"), results.sweep(stage, "l2", 0.25))
            for stage, label in FIGURE2.items()]
    bars = [b for b in bars if b[3] is not None]
    if not any(stage in ("d_robust", "d_nonrobust") for stage, *_ in bars):
        return None  # the figure is about D_R / D_NR: without them (quick preset) it would only repeat the table
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.3 * len(bars) + 2, 3.6))
    for i, (_, _, paper, acc, rob) in enumerate(bars):
        ax.bar(i - 0.2, 100 * acc, 0.4, color="tab:blue", label="clean" if i == 0 else None)
        ax.bar(i + 0.2, 100 * (rob or 0), 0.4, color="tab:orange", label="L2 eps 0.25" if i == 0 else None)
        for dx, value in zip((-0.2, 0.2), paper, strict=True):
            if value is not None:
                ax.plot([i + dx - 0.18, i + dx + 0.18], [value] * 2, color="black", lw=2,
                        label="paper" if i == 0 and dx < 0 else None)
    ax.set_xticks(range(len(bars)), [b[1] for b in bars])
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title="Ilyas et al. Figure 2: train on, test on real CIFAR-10")
    ax.legend(fontsize=8)
    return save(fig, path)


def accuracy_vs_eps(records: Mapping[str, dict | None], path: Path) -> Path | None:
    """One curve per model (its robust_accuracy.json sweep on the true labels), one panel per norm."""
    sweeps = {name: r["results"]["test"]["sweep"] for name, r in records.items()
              if r and r.get("kind") == "train" and r["results"].get("test", {}).get("sweep")}
    if not sweeps:
        return None
    plt = pyplot()
    norms = sorted({row["norm"] for rows in sweeps.values() for row in rows})
    fig, axes = plt.subplots(1, len(norms), figsize=(5.5 * len(norms), 4), squeeze=False)
    colours = plt.get_cmap("tab20").colors  # more models than the default cycle's 10 colours
    for ax, norm in zip(axes[0], norms, strict=True):
        for i, (name, rows) in enumerate(sweeps.items()):
            pts = sorted((r["eps"] * (255 if norm == "linf" else 1), 100 * r["robust_acc"]) for r in rows
                         if r["norm"] == norm)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name, color=colours[i % len(colours)])
        ax.set(xlabel=f"{norm} eps" + (" (x 1/255)" if norm == "linf" else ""), ylabel="accuracy (%)",
               ylim=(0, 100), title=f"accuracy under {norm} PGD")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    return save(fig, path)


def figure3(results: Results, path: Path) -> Path | None:
    """Scatter: targeted transfer rate vs. test accuracy of D_det-style sets, the paper's points in grey."""
    points = [p for p in results.points() if p.get("accuracy") is not None and p.get("transfer") is not None]
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (x, y) in PAPER_FIGURE3.items():
        ax.scatter(x, y, color="lightgrey", edgecolor="grey", zorder=2)
        ax.annotate(label, (x, y), fontsize=7, color="grey", xytext=(3, 3), textcoords="offset points")
    for p in points:  # a legend, not annotations: Nakkiran's points crowd near (0, 0)
        ax.scatter(100 * p["transfer"], 100 * p["accuracy"], zorder=3, label=p["label"])
    ax.legend(fontsize=7, loc="upper left")
    ax.axhline(10, color="grey", ls=":", lw=1)
    ax.set(xlabel="targeted transfer to an independent model (%)", ylabel="test accuracy, true labels (%)",
           xlim=(-5, 105), ylim=(-5, 100), title="Ilyas et al. Figure 3 (grey: paper; colour: this suite)")
    ax.grid(alpha=0.3)
    return save(fig, path)


def goh_features(results: Results, path: Path) -> Path | None:
    """Goh's scatter (SPEC 5.2): usefulness against robustness of the basis vectors and of the two constructions,
    with the curve below which a feature is not robust at the measured eps."""
    measured = results.measured("goh_features", "basis")
    if not measured:
        return None
    goh = results.measured("goh_features")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(measured["robustness"], measured["usefulness"], s=6, color="tab:blue", alpha=0.6,
               label=f"basis vectors (the {len(measured['robustness'])} most robust)")
    for name, colour in (("ensemble", "tab:red"), ("containment", "tab:green")):
        ax.scatter(goh[name]["robustness"], goh[name]["usefulness"], s=60, marker="*", color=colour, label=name,
                   zorder=3)
    part = goh["containment"]["robust_part"]
    ax.scatter(part["robustness"], part["usefulness"], s=40, marker="o", facecolor="none", edgecolor="tab:green",
               label="containment's robust direction", zorder=3)
    xs = sorted(r for r in measured["robustness"] if r > 0)
    ax.plot(xs, [goh["eps"] / r for r in xs], color="grey", ls="--", lw=1, label=f"robust usefulness 0 at L2 eps "
            f"{goh['eps']:g}")
    ax.set(xscale="log", ylim=(-0.3, 1.0), xlabel="robustness ||a||_Sigma / ||a||_2 (pixel units)",
           ylabel="usefulness E[y f(x)], held-out images",
           title=f"Goh: useful non-robust features ({goh['classes'][0]} vs {goh['classes'][1]})")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return save(fig, path)


def fourier_heat_maps(results: Results, path: Path) -> Path | None:
    """Gilmer & Hendrycks / Yin et al.: each model's error under Fourier-basis noise, frequency by frequency."""
    measured = results.measured("frequency", "models")
    if not measured:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(measured), figsize=(3.2 * len(measured) + 0.8, 3.4), squeeze=False)
    norm = results.measured("frequency", "norm")
    for ax, (name, model) in zip(axes[0], measured.items(), strict=True):
        size = len(model["error_map"])
        shown = ax.imshow([[100 * e for e in row] for row in model["error_map"]], vmin=0, vmax=100, cmap="viridis",
                          extent=(-size / 2 - 0.5, size / 2 - 0.5, size / 2 - 0.5, -size / 2 - 0.5))
        ax.set(title=f"{name}\nfog {100 * model['fog_acc']:.0f}%, contrast {100 * model['contrast_acc']:.0f}%",
               xlabel="frequency v", ylabel="frequency u")
        ax.title.set_fontsize(8)
    fig.colorbar(shown, ax=list(axes[0]), label=f"test error (%), Fourier noise of L2 norm {norm:g}")
    return save(fig, path)


def layer_robustness(results: Results, path: Path) -> Path | None:
    """The rebuttal's layer robustness: R(f) layer by layer, one line per model (lower: more robust)."""
    measured = results.measured("layer_robustness", "models")
    if not measured:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, model in measured.items():
        layers = list(model["layers"])
        ax.plot(range(len(layers)), [model["layers"][k]["R"] for k in layers], marker="o", label=name)
    ax.set_xticks(range(len(layers)), [k.replace(" (", "\n(") for k in layers], fontsize=7)
    eps = results.measured("layer_robustness", "eps")
    ax.set(ylabel=f"R(f) at L2 eps {eps:g}", ylim=(0, None),
           title="Layer robustness: worst-case change in the ball / distance between images")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save(fig, path)


def inversion_grid(goal, labels, inverted: Mapping[str, object], path: Path, per_class: int = 1) -> Path:
    """Representation inversion from noise: a column per class (its first ``per_class`` goal images), the goal
    images in the first row and each model's inversions below."""
    from common.datasets import CIFAR10_CLASSES

    columns = [i for c in range(len(CIFAR10_CLASSES)) for i in (labels == c).nonzero().flatten()[:per_class].tolist()]
    rows = {"goal image": goal, **inverted}
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.1 * len(columns), 1.2 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c, i in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(CIFAR10_CLASSES[int(labels[i])], fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle("Representation inversion from uniform noise", fontsize=9)
    return save(fig, path)


def copy_measured_figure(results: Results, stage: str, path: Path) -> Path | None:
    """The figure a measure stage drew itself (its ``figure`` result), copied to ``path``."""
    source = results.measured(stage, "figure")
    if not source or not Path(source).is_file():
        return None
    return copy_atomic(Path(source), path)


def copy_atomic(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, source.read_bytes())
    return target


def collect_grids(records: Mapping[str, dict | None], folder: Path) -> dict[str, Path]:
    """Copy the example grid of every constructed dataset a stage trained on to ``folder/examples_<stage>.png``."""
    copied = {}
    for name, record in records.items():
        grid = ((record or {}).get("artifacts") or {}).get("examples_grid")
        if grid and Path(grid).is_file():
            copied[name] = copy_atomic(Path(grid), folder / f"examples_{name}.png")
    return copied


def write_figures(records: Mapping[str, dict | None], folder: Path) -> dict[str, Path]:
    """Every figure that has data, by name."""
    results = Results(records)
    made = {"figure2": figure2(results, folder / "figure2_robust_datasets.png"),
            "accuracy_vs_eps": accuracy_vs_eps(records, folder / "accuracy_vs_eps.png"),
            "figure3": figure3(results, folder / "figure3_transfer.png"),
            "goh_features": goh_features(results, folder / "goh_features.png"),
            "fourier_heat_maps": fourier_heat_maps(results, folder / "fourier_heat_maps.png"),
            "layer_robustness": layer_robustness(results, folder / "layer_robustness.png"),
            "inversion_from_noise": copy_measured_figure(results, "inversion", folder / "inversion_from_noise.png")}
    made.update({f"examples_{k}": v for k, v in collect_grids(records, folder).items()})
    return {k: v for k, v in made.items() if v is not None}
