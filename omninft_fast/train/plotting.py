"""The one plotting style of the trainer's figures (matplotlib's object API on the Agg canvas, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(
        color=["#dc322f", "#268bd2", "#859900", "#d33682", "#b58900", "#2aa198", "#6c71c4", "#cb4b16"]
    ),
    "legend.frameon": False,
    "lines.linewidth": 1.5,
}


def new_figure() -> Figure:
    """A figure in ``STYLE`` on an Agg canvas."""
    with matplotlib.rc_context(STYLE):
        figure = Figure()
        FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> None:
    """Write ``figure`` (PNG for a ``.png`` path) in ``STYLE``."""
    with matplotlib.rc_context(STYLE):
        figure.tight_layout()
        figure.savefig(path)


def plot_curves(
    path: str | Path,
    x: list[int],
    curves: dict[str, list[float]],
    *,
    title: str = "reward mean per iteration",
    xlabel: str = "iteration",
    ylabel: str = "reward mean",
) -> None:
    """One line per curve (each ``len(x)`` values) on shared axes with integer ``x``, labelled with its first and
    last values."""
    figure = new_figure()
    with matplotlib.rc_context(STYLE):
        axes = figure.add_subplot()
        for name, values in curves.items():
            label = f"{name}: {values[0]:.3f} -> {values[-1]:.3f}" if values else name
            axes.plot(x, values, marker="o" if len(values) == 1 else None, label=label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(title)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.legend(loc="best")
    save_figure(figure, path)


def plot_intervals(
    path: str | Path,
    labels: list[str],
    panels: dict[str, list[tuple[float, float]]],
    *,
    reference: dict[str, float] | None = None,
    reference_label: str = "before",
    title: str = "",
) -> None:
    """One panel per entry of ``panels``, side by side: for each of ``labels`` a point at its mean with an error bar
    of ``+- half_width`` (each panel a list of ``len(labels)`` ``(mean, half_width)`` pairs), and a dashed line at
    ``reference[name]`` where given."""
    figure = new_figure()
    with matplotlib.rc_context(STYLE):
        figure.set_size_inches(max(6.4, 2.6 * len(panels)), 3.6)
        positions = list(range(len(labels)))
        for k, (name, values) in enumerate(panels.items()):
            axes = figure.add_subplot(1, len(panels), k + 1)
            means = [mean for mean, _ in values]
            errors = [half for _, half in values]
            colour = STYLE["axes.prop_cycle"].by_key()["color"][k % 8]
            axes.errorbar(positions, means, yerr=errors, fmt="o", capsize=4, color=colour)
            if reference is not None and name in reference:
                axes.axhline(reference[name], linestyle="--", color="0.5", label=reference_label)
                axes.legend(loc="best")
            axes.set_xticks(positions, labels, rotation=30, ha="right")
            axes.set_title(name)
        if title:
            figure.suptitle(title)
    save_figure(figure, path)
