"""The Atari 100k results table (Markdown, CSV, LaTeX), its JSON of aggregates, and figures.

`build_report` computes everything from MethodScores (published baselines and this pipeline's
runs); `write_report` renders it. Layout follows the DIAMOND paper's main table: one row per
game with each method's mean raw score, then the aggregate rows over human-normalized scores.

Partial coverage is never hidden: every method is aggregated over its own games only, its
aggregate cells carry a mark and a footnote naming the games, and when this pipeline's runs
cover fewer than the 26 games every method is also aggregated over exactly those games, in a
separate block, so that the like-for-like comparison is there to read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot (rliable imports it)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rliable import plot_utils  # noqa: E402

from diamond.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from diamond.results.metrics import (  # noqa: E402
    METRIC_LABELS,
    METRICS,
    Improvement,
    MethodAggregates,
    _aggregate_vector,
    aggregate,
    improvement_over,
    performance_profiles,
    score_matrix,
)
from diamond.results.scores import MethodScores, atari_100k_games, human_normalized, human_scores, random_scores  # noqa: E402

TABLE_STEM = "atari100k_table"
AGGREGATE_JSON = "atari100k_aggregate.json"
FIGURES = {
    "aggregates": "atari100k_aggregate_metrics.png",
    "profiles": "atari100k_performance_profiles.png",
    "per_game": "atari100k_per_game_hns.png",
    "improvement": "atari100k_probability_of_improvement.png",
}
PROFILE_TAUS = np.linspace(0.0, 8.0, 81)  # HNS thresholds, as in rliable's Atari 100k profiles
ROW_LABELS = {
    "superhuman": "#Superhuman (↑)",
    "mean": "Mean HNS (↑)",
    "median": "Median HNS (↑)",
    "iqm": "IQM HNS (↑)",
    "optimality_gap": "Optimality gap (↓)",
}
PARTIAL_MARK = "†"
DPI = 80  # keeps the committed reference figures small
PAIR_SEPARATOR = "\x1f"  # between the two methods of a probability-of-improvement pair (in no name)


@dataclass(frozen=True)
class Subset:
    """Every method aggregated over the games of one partially evaluated pipeline method."""

    owner: str
    games: tuple[str, ...]
    aggregates: dict[str, MethodAggregates]


@dataclass(frozen=True)
class Report:
    reference: list[MethodScores]
    runs: list[MethodScores]
    aggregates: dict[str, MethodAggregates]  # each method over its own games
    subsets: list[Subset]
    improvements: list[Improvement]
    profiles: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
    bootstrap: dict = field(default_factory=dict)

    @property
    def methods(self) -> list[MethodScores]:
        return self.reference + self.runs

    @property
    def reference_only(self) -> bool:
        return not self.runs


def build_report(
    reference: Sequence[MethodScores], runs: Sequence[MethodScores], reps: int, confidence: float, seed: int
) -> Report:
    """All numbers of the report. Improvement is that of each pipeline method over every baseline;
    with no runs (reference-only), that of the first reference method over the others."""
    methods = list(reference) + list(runs)
    if not methods:
        raise ValueError("nothing to report: no reference method and no run")
    matrices = [score_matrix(m) for m in methods]
    aggregates = aggregate(matrices, reps, confidence, seed)
    subsets = []
    for run in runs:
        if len(run.games) < len(atari_100k_games()):
            sub = [score_matrix(m, run.games) for m in methods if all(g in m.scores for g in run.games)]
            if len(sub) < 2:  # nothing to set beside the run's own aggregates
                continue
            subsets.append(Subset(run.name, tuple(run.games), aggregate(sub, reps, confidence, seed)))
    if runs:
        improvements = [i for run in runs for i in improvement_over(run, reference, reps, confidence, seed)]
    else:
        improvements = improvement_over(reference[0], reference[1:], reps, confidence, seed) if reference else []
    profiles: tuple[dict, dict] = ({}, {})
    for m in matrices:  # one seeded bootstrap per method, so adding a method changes no other's band
        p, ci = performance_profiles([m], PROFILE_TAUS, reps, confidence, seed)
        profiles[0].update(p)
        profiles[1].update(ci)
    bootstrap = {
        "reps": reps,
        "confidence": confidence,
        "seed": seed,
        "method": "rliable stratified bootstrap (runs resampled within each game), percentile intervals",
    }
    return Report(list(reference), list(runs), aggregates, subsets, improvements, profiles, bootstrap)


# ---------------------------------------------------------------- the table


@dataclass
class Cell:
    value: float | int | str | None
    ci: tuple[float, float] | None = None
    fmt: str = ".1f"
    mark: str = ""
    bold: bool = False

    def text(self, ci_style: str = "md") -> str:
        if self.value is None:
            return "–" if ci_style != "tex" else "--"
        v = self.value if isinstance(self.value, str) else format(self.value, self.fmt)
        if self.ci is not None:
            lo, hi = (format(x, self.fmt) for x in self.ci)
            v = f"{v} [{lo}, {hi}]" if ci_style == "md" else f"{v} {{\\scriptsize [{lo}, {hi}]}}"
        if self.bold:
            v = f"**{v}**" if ci_style == "md" else f"\\textbf{{{v}}}"
        mark = "$^\\dagger$" if ci_style == "tex" and self.mark == PARTIAL_MARK else self.mark
        return v + mark


@dataclass
class Table:
    columns: list[str]
    rows: list[tuple[str, dict[str, Cell]]]
    notes: list[str]


def _partial_label(agg: MethodAggregates) -> str:
    return f"{agg.name} ({len(agg.games)}/{len(atari_100k_games())} games)" if agg.partial else agg.name


def _aggregate_rows(
    aggs: dict[str, MethodAggregates], columns: list[str], suffix: str, fixed: dict[str, dict[str, float]]
) -> list[tuple[str, dict[str, Cell]]]:
    """The aggregate rows; the best value among methods covering the same games is bold."""
    comparable = [n for n, a in aggs.items() if not a.partial] or list(aggs)
    if suffix:  # inside a subset block every method covers the same games
        comparable = list(aggs)
    rows = []
    for key in ("superhuman", *("mean", "median", "iqm", "optimality_gap")):
        cells: dict[str, Cell] = {}
        for name in columns:
            if name in fixed:
                cells[name] = Cell(fixed[name][key], fmt="d" if key == "superhuman" else ".3f")
            elif name in aggs:
                a = aggs[name]
                mark = PARTIAL_MARK if a.partial and not suffix else ""
                if key == "superhuman":
                    cells[name] = Cell(a.superhuman, fmt="d", mark=mark)
                else:
                    e = a.estimates[key]
                    cells[name] = Cell(e.value, (e.lo, e.hi), fmt=".3f", mark=mark)
            else:
                cells[name] = Cell(None)
        best = [cells[n].value for n in comparable if n in cells and cells[n].value is not None]
        if len(best) > 1:  # bold picks a winner; a lone method has none
            target = min(best) if key == "optimality_gap" else max(best)
            for n in comparable:
                if cells[n].value == target:
                    cells[n].bold = True
        rows.append((ROW_LABELS[key] + suffix, cells))
    games_cells = {n: Cell(len(aggs[n].games), fmt="d") if n in aggs else Cell(None) for n in columns}
    runs_cells = {}
    for n in columns:
        if n not in aggs:
            runs_cells[n] = Cell(None)
            continue
        lo, hi = aggs[n].runs_available
        runs_cells[n] = Cell(lo, fmt="d") if lo == hi else Cell(f"{lo} (of {lo}-{hi})", mark=PARTIAL_MARK)
    rows.append(("Games" + suffix, games_cells))
    rows.append(("Runs per game" + suffix, runs_cells))
    return rows


def build_table(report: Report) -> Table:
    games = atari_100k_games()
    names = [m.name for m in report.methods]
    columns = ["Random", "Human", *names]
    rows: list[tuple[str, dict[str, Cell]]] = []
    for g in games:
        cells = {"Random": Cell(random_scores()[g]), "Human": Cell(human_scores()[g])}
        present = {}
        for m in report.methods:
            if g in m.scores:
                present[m.name] = float(np.mean(m.scores[g]))
                cells[m.name] = Cell(present[m.name])
            else:
                cells[m.name] = Cell(None)
        if present:
            best = max(present.values())
            for n, v in present.items():
                cells[n].bold = v == best
        rows.append((g, cells))
    fixed = {"Random": _fixed_aggregates(random_scores()), "Human": _fixed_aggregates(human_scores())}
    rows += _aggregate_rows(report.aggregates, columns, "", fixed)
    for imp_subject in dict.fromkeys(i.subject for i in report.improvements):
        cells = {n: Cell(None) for n in columns}
        for imp in (i for i in report.improvements if i.subject == imp_subject):
            e = imp.estimate
            cells[imp.baseline] = Cell(e.value, (e.lo, e.hi), fmt=".3f")
        rows.append((f"P({imp_subject} > column)", cells))
    for sub in report.subsets:
        suffix = f", {_games(len(sub.games))} of {sub.owner}"
        rows += _aggregate_rows(sub.aggregates, columns, suffix, {})
    return Table(columns, rows, _notes(report))


def _games(n: int) -> str:
    return f"{n} game" if n == 1 else f"{n} games"


def _fixed_aggregates(scores: dict[str, float]) -> dict[str, float]:
    """Random and Human columns: their aggregates by definition (0 and 1), computed the same way."""
    hns = np.array([[human_normalized(g, s) for g, s in scores.items()]])
    vec = _aggregate_vector(hns)
    out = {k: float(vec[i]) for i, k in enumerate(METRICS)}
    out["superhuman"] = int(np.sum(hns > 1.0))
    return out


def _notes(report: Report) -> list[str]:
    n = len(atari_100k_games())
    b = report.bootstrap
    notes = [
        "Game rows: mean raw game score over runs (bold: best method on that game). "
        f"Aggregate rows: human-normalized scores (HNS) over runs and games, with {b['confidence']:.0%} "
        f"stratified bootstrap intervals (rliable, {b['reps']} replicates, seed {b['seed']}). "
        "#Superhuman counts games whose mean HNS is above 1. Bold in aggregate rows: best among methods "
        "evaluated on the same games.",
    ]
    for name, a in report.aggregates.items():
        if a.partial:
            notes.append(
                f"{PARTIAL_MARK} {name} is evaluated on {len(a.games)} of {n} games "
                f"({', '.join(a.games)}); its aggregates cover those games only and are not comparable "
                "with the 26-game aggregates beside them."
            )
        lo, hi = a.runs_available
        if lo != hi:
            notes.append(
                f"{PARTIAL_MARK} {name} has {lo} to {hi} runs per game; its aggregates and intervals use the "
                f"first {lo} seeds of every game (rliable needs equal runs per game), its game rows all runs."
            )
    for sub in report.subsets:
        notes.append(
            f"Rows ending in '{_games(len(sub.games))} of {sub.owner}' aggregate every method over exactly "
            f"the games {sub.owner} was evaluated on: the like-for-like comparison."
        )
    if report.improvements:
        notes.append(
            "P(X > column): probability of improvement, the chance that a run of X scores above a run of the "
            "column's method on a game, averaged over the games both have (0.5: no difference)."
        )
    single = [m.name for m in report.methods if max(m.runs_per_game().values()) == 1]
    if single:
        notes.append(
            f"{', '.join(single)}: one run (or one published mean) per game, so the intervals have zero "
            "width: no run-to-run spread is available, which is not certainty."
        )
    return notes


def table_markdown(t: Table) -> str:
    head = "| Game | " + " | ".join(t.columns) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in t.columns) + " |"
    lines = [head, sep]
    for label, cells in t.rows:
        lines.append(f"| {label} | " + " | ".join(cells[c].text("md") for c in t.columns) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in t.notes) + "\n"


def table_csv(t: Table) -> str:
    """Machine-readable: plain numbers, one CI bound per row, empty where a method has no value."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", *t.columns])
    for label, cells in t.rows:
        w.writerow([label, *(_csv_value(cells[c].value) for c in t.columns)])
        if any(cells[c].ci is not None for c in t.columns):
            for i, bound in enumerate(("ci_low", "ci_high")):
                w.writerow([f"{label} {bound}", *(_csv_value(cells[c].ci[i]) if cells[c].ci else "" for c in t.columns)])
    return buf.getvalue()


def _csv_value(v: float | int | str | None) -> str:
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def table_latex(t: Table) -> str:
    def esc(s: str) -> str:
        s = s.replace("\\", "\\textbackslash{}")
        for a, b in (("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("↑", "$\\uparrow$"), ("↓", "$\\downarrow$")):
            s = s.replace(a, b)
        return s.replace(PARTIAL_MARK, "$^\\dagger$").replace(">", "$>$")

    lines = [
        "% Generated by `python -m stages.aggregate`; needs \\usepackage{booktabs}.",
        "\\begin{tabular}{l" + "r" * len(t.columns) + "}",
        "\\toprule",
        "Game & " + " & ".join(esc(c) for c in t.columns) + " \\\\",
        "\\midrule",
    ]
    n_games = len(atari_100k_games())
    for i, (label, cells) in enumerate(t.rows):
        if i == n_games:
            lines.append("\\midrule")
        # Cells hold only numbers and their own LaTeX markup; labels and names need escaping.
        lines.append(esc(label) + " & " + " & ".join(cells[c].text("tex") for c in t.columns) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    lines += [f"% {esc(n)}" for n in t.notes]
    return "\n".join(lines) + "\n"


def report_json(report: Report) -> dict:
    """atari100k_aggregate.json: {"methods": {name: {mean: {value, ci}, ..., superhuman, games,
    runs_per_game}}, plus subsets, probability of improvement, per-game scores and settings."""
    poi: dict[str, dict] = {}
    for i in report.improvements:
        poi.setdefault(i.subject, {})[i.baseline] = i.to_json()
    return {
        "methods": {n: a.to_json() for n, a in report.aggregates.items()},
        "subsets": {
            s.owner: {"games": list(s.games), "methods": {n: a.to_json() for n, a in s.aggregates.items()}}
            for s in report.subsets
        },
        "probability_of_improvement": poi,
        "per_game": {
            m.name: {
                g: {
                    "mean_return": float(np.mean(m.scores[g])),
                    "human_normalized_score": float(np.mean(human_normalized(g, m.scores[g]))),
                    "runs": int(len(m.scores[g])),
                }
                for g in m.games
            }
            for m in report.methods
        },
        "reference_methods": [m.name for m in report.reference],
        "run_methods": [m.name for m in report.runs],
        "reference_only": report.reference_only,
        "bootstrap": report.bootstrap,
        "num_games": len(atari_100k_games()),
    }


# ---------------------------------------------------------------- figures


def _labels(report: Report) -> dict[str, str]:
    return {n: _partial_label(a) for n, a in report.aggregates.items()}


def save_figure(fig: plt.Figure, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_aggregates(report: Report, path: Path) -> None:
    labels = _labels(report)
    points = {labels[n]: np.array([a.estimates[k].value for k in METRICS]) for n, a in report.aggregates.items()}
    cis = {
        labels[n]: np.array([[a.estimates[k].lo for k in METRICS], [a.estimates[k].hi for k in METRICS]])
        for n, a in report.aggregates.items()
    }
    # Rows at least 0.45 in tall and the axis label about 0.5 in below the axes, whatever the
    # number of methods (rliable sizes the figure by rows and places the label in figure units).
    row_height = max(0.45, 2.0 / len(points))
    fig, _ = plot_utils.plot_interval_estimates(
        points, cis, metric_names=[METRIC_LABELS[k] for k in METRICS], algorithms=list(points),
        xlabel="Human Normalized Score", row_height=row_height,
        xlabel_y_coordinate=-0.55 / (row_height * len(points)),
    )
    save_figure(fig, path)


def plot_profiles(report: Report, path: Path) -> None:
    labels = _labels(report)
    profiles, cis = report.profiles
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plot_utils.plot_performance_profiles(
        {labels[k]: v for k, v in profiles.items()}, PROFILE_TAUS,
        performance_profile_cis={labels[k]: v for k, v in cis.items()}, ax=ax,
        xlabel=r"Human Normalized Score ($\tau$)", ylabel=r"Fraction of runs with score $> \tau$",
    )
    ax.legend(loc="upper right", fontsize="small")
    save_figure(fig, path)


def plot_per_game(report: Report, path: Path) -> None:
    """Per-game mean HNS of every method, side by side; the dashed line is the human score."""
    games = atari_100k_games()
    methods = report.methods
    fig, ax = plt.subplots(figsize=(8, 0.12 * len(games) * (len(methods) + 1) + 1))
    height = 0.8 / len(methods)
    colors = plt.get_cmap("tab10")
    y = np.arange(len(games))[::-1]
    for j, m in enumerate(methods):
        vals = [float(np.mean(human_normalized(g, m.scores[g]))) if g in m.scores else np.nan for g in games]
        ax.barh(y + (len(methods) / 2 - j - 0.5) * height, vals, height=height, color=colors(j % 10), label=m.name)
    ax.axvline(1.0, color="k", linestyle="--", linewidth=1)
    ax.set_xscale("symlog", linthresh=1.0)  # a few games reach tens of human scores
    ax.set_yticks(y, games)
    ax.set_ylim(-0.6, len(games) - 0.4)
    ax.set_xlabel("Human normalized score (mean over runs; symlog scale)")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(True, axis="x", alpha=0.3)
    save_figure(fig, path)


def plot_improvement(report: Report, path: Path) -> None:
    if not report.improvements:  # still write the file: pipelines declare a fixed set of outputs
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "No baseline shares a game with these runs", ha="center", va="center")
        save_figure(fig, path)
        return
    # rliable splits each key on the separator; method names may hold commas
    sep = PAIR_SEPARATOR
    points = {f"{i.subject}{sep}{i.baseline}": np.array([i.estimate.value]) for i in report.improvements}
    cis = {f"{i.subject}{sep}{i.baseline}": np.array([[i.estimate.lo], [i.estimate.hi]]) for i in report.improvements}
    fig, ax = plt.subplots(figsize=(5, 0.5 * len(points) + 1))
    plot_utils.plot_probability_of_improvement(points, cis, pair_separator=sep, ax=ax, ticklabelsize="medium",
                                               labelsize="medium")
    save_figure(fig, path)


def write_report(report: Report, out_dir: Path) -> list[Path]:
    """Write tables, JSON and figures under `out_dir`; returns the files written."""
    out_dir = Path(out_dir)
    table = build_table(report)
    written = []
    for suffix, text in (("md", table_markdown(table)), ("csv", table_csv(table)), ("tex", table_latex(table))):
        path = out_dir / f"{TABLE_STEM}.{suffix}"
        atomic_write_bytes(path, text.encode())
        written.append(path)
    atomic_write_json(out_dir / AGGREGATE_JSON, report_json(report))
    written.append(out_dir / AGGREGATE_JSON)
    plots = {
        "aggregates": plot_aggregates, "profiles": plot_profiles,
        "per_game": plot_per_game, "improvement": plot_improvement,
    }
    for key, plot in plots.items():
        plot(report, out_dir / FIGURES[key])
        written.append(out_dir / FIGURES[key])
    return written
