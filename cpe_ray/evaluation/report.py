"""Evaluation reports: JSON results, a short Markdown page, and PNG plots (matplotlib, Agg).

Every writer is atomic (a temporary sibling renamed into place), so an interrupted run
never leaves half a report. JSON has no NaN: undefined numbers are written as null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FIGURE_SIZE = (6.4, 4.0)
FIGURE_DPI = 100
EVEN = 50.0  # the win rate of a model as good as its baseline, in percent
POINT_ALPHA = 0.6
ERROR_BAR_CAPSIZE = 6
PERCENT = 100.0
PROBABILITY_LIMITS = (-0.05, 1.05)  # y range of preference plots
TITLE_CHARS = 80  # plot titles are cut here


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: Path, data: Any) -> Path:
    return _write_text(path, json.dumps(_clean(data), indent=2, ensure_ascii=False,
                                        allow_nan=False) + "\n")


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    return _write_text(path, "".join(json.dumps(_clean(r), ensure_ascii=False, allow_nan=False)
                                     + "\n" for r in rows))


def write_markdown(path: Path, lines: Sequence[str]) -> Path:
    return _write_text(path, "\n".join(lines).rstrip() + "\n")


def percent(value: float | None) -> float | None:
    """A fraction as a percentage; None stays None."""
    return None if value is None else PERCENT * value


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table; undefined numbers are an em dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=FIGURE_DPI)
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def _finite(v: float | None) -> float:
    return v if v is not None and math.isfinite(v) else 0.0


def plot_bars(path: Path, labels: Sequence[str], values: Sequence[float | None],
              errors: Sequence[float | None], ylabel: str, title: str,
              reference: float | None = None, ymax: float = PERCENT) -> Path:
    """Bars with +-1 standard error; undefined values are drawn as 0 with no error bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    xs = range(len(labels))
    ax.bar(xs, [_finite(v) for v in values], yerr=[_finite(e) for e in errors],
           capsize=ERROR_BAR_CAPSIZE, color=[f"C{i}" for i in xs])
    for x, v in zip(xs, values, strict=True):
        ax.annotate(fmt(v), (x, _finite(v)), ha="center", va="bottom",
                    textcoords="offset points", xytext=(0, 2))
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(list(xs), list(labels))
    ax.set_ylim(0, ymax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def plot_winrates(path: Path, win_rate: float, win_se: float, lc: float, lc_se: float,
                  title: str) -> Path:
    """Raw and length-controlled win rates with +-1 standard error and the 50% line."""
    return plot_bars(path, ["win rate", "LC win rate"], [win_rate, lc], [win_se, lc_se],
                     "percent (+-1 s.e.)", title, reference=EVEN)


def plot_scatter(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]],
                 xlabel: str, ylabel: str, title: str,
                 curve: tuple[Sequence[float], Sequence[float]] | None = None,
                 ylim: tuple[float, float] | None = None) -> Path:
    """One colour per series; points whose y is None are left out (and counted in the title
    by the caller). `curve` is an optional fitted line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    for i, (label, (xs, ys)) in enumerate(series.items()):
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label,
                       alpha=POINT_ALPHA, color=f"C{i}")
    if curve is not None:
        ax.plot(list(curve[0]), list(curve[1]), color="black", linewidth=1, label="GLM fit")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    return _save(fig, path)
