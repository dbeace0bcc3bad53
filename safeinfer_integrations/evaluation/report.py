"""``report.md`` and PNG plots (matplotlib, Agg backend) from an evaluation summary."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOTS: tuple[tuple[str, str, str, str], ...] = (
    # (file name, kind, per-category rate field, title)
    (
        "unsafe_by_category.png",
        "harmful",
        "unsafe_rate",
        "Unsafe-response rate on harmful prompts (lower is better)",
    ),
    (
        "over_refusal_by_category.png",
        "benign",
        "over_refusal_rate",
        "Over-refusal rate on benign prompts (lower is better)",
    ),
    (
        "helpfulness_by_category.png",
        "qa",
        "helpfulness",
        "Helpfulness: reference answer given (higher is better)",
    ),
)
OVERVIEW = "overview.png"
FRAMINGS_PLOT = "framings.png"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _categories(modes: Mapping[str, Any], kind: str) -> list[str]:
    names: dict[str, None] = {}
    for metrics in modes.values():
        names.update(dict.fromkeys(metrics["per_category"][kind]))
    return list(names)


def plot_grouped(
    modes: Mapping[str, Any], kind: str, field: str, title: str, path: str | os.PathLike[str]
) -> Path | None:
    """Grouped bars: one group per category, one bar per mode. None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    categories = _categories(modes, kind)
    if not categories:
        return None
    names = list(modes)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(categories) + 2), 4.2))
    for index, mode in enumerate(names):
        per = modes[mode]["per_category"][kind]
        values = [100 * (per.get(c, {}).get(field) or 0.0) for c in categories]
        xs = [i + (index - (len(names) - 1) / 2) * width for i in range(len(categories))]
        ax.bar(xs, values, width=width, label=mode)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_overview(modes: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """The three headline rates of every mode side by side."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fields = (
        ("unsafe_rate", "unsafe rate"),
        ("over_refusal_rate", "over-refusal"),
        ("helpfulness", "helpfulness"),
    )
    names = list(modes)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, mode in enumerate(names):
        values = [100 * (modes[mode].get(f) or 0.0) for f, _ in fields]
        xs = [i + (index - (len(names) - 1) / 2) * width for i in range(len(fields))]
        bars = ax.bar(xs, values, width=width, label=mode)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(fields)))
    ax.set_xticklabels([label for _, label in fields])
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title("SafeInfer evaluation: headline rates per mode", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _headline_table(modes: Mapping[str, Any]) -> list[str]:
    lines = [
        "| mode | unsafe rate | over-refusal | helpfulness | vs vanilla | fluency (ppl) | tokens/s | "
        "undecided (harmful / benign) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in modes.items():
        h, b, q = m["harmful"], m["benign"], m["qa"]
        lines.append(
            f"| {mode} | {_pct(m['unsafe_rate'])} ({h['unsafe']}/{h['unsafe'] + h['safe']}) "
            f"| {_pct(m['over_refusal_rate'])} ({b['refused']}/{b['refused'] + b['answered']}) "
            f"| {_pct(m['helpfulness'])} ({q['correct']}/{q['n']}) "
            f"| {_pct(m.get('helpfulness_vs_vanilla'))} | {_num(m['fluency_ppl'], 2)} "
            f"| {_num(m['tokens_per_s'])} | {h['undecided']} / {b['undecided']} |"
        )
    return lines


def _framing_table(framings: Mapping[str, Any]) -> list[str]:
    """One row per (framing, mode): the safety rates, repetition and fluency under that framing."""
    lines = [
        "| framing | mode | unsafe rate | over-refusal | refusals that repeat themselves | answers that repeat "
        "themselves | fluency (ppl) |",
        "|---|---|---|---|---|---|---|",
    ]
    for framing, modes in framings.items():
        for mode, m in modes.items():
            lines.append(
                f"| {framing} | {mode} | {_pct(m['unsafe_rate'])} | {_pct(m['over_refusal_rate'])} "
                f"| {_pct(m.get('refusal_repetition_rate'))} | {_pct(m.get('repetition_rate'))} "
                f"| {_num(m['fluency_ppl'], 2)} |"
            )
    return lines


def plot_framings(framings: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Unsafe rate and over-refusal per framing, one bar per mode."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(mode for modes in framings.values() for mode in modes))
    width = 0.8 / max(len(names), 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (field, title) in zip(
        axes, (("unsafe_rate", "unsafe rate on harmful prompts"), ("over_refusal_rate", "over-refusal on benign"))
    ):
        for index, mode in enumerate(names):
            values = [100 * (framings[f].get(mode, {}).get(field) or 0.0) for f in framings]
            xs = [i + (index - (len(names) - 1) / 2) * width for i in range(len(framings))]
            axis.bar_label(axis.bar(xs, values, width=width, label=mode), fmt="%.0f", fontsize=7)
        axis.set_xticks(range(len(framings)))
        axis.set_xticklabels(list(framings))
        axis.set_ylabel("%")
        axis.set_ylim(0, 105)
        axis.set_title(f"{title} (lower is better), per framing", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _category_table(modes: Mapping[str, Any], kind: str, field: str) -> list[str]:
    categories = _categories(modes, kind)
    if not categories:
        return ["(no data)"]
    names = list(modes)
    lines = ["| category | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for category in categories:
        n = max(modes[m]["per_category"][kind].get(category, {}).get("n", 0) for m in names)
        cells = [_pct(modes[m]["per_category"][kind].get(category, {}).get(field)) for m in names]
        lines.append(f"| {category} | {n} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(summary: Mapping[str, Any], images: Sequence[str] = ()) -> str:
    """The report as Markdown (headline table, per-category tables, image links)."""
    run, modes = summary["run"], summary["modes"]
    counts = summary.get("counts", {})
    out = [
        "# SafeInfer evaluation report",
        "",
        f"- model: `{run['model']}`; safety vector: `{run.get('vector_id')}`",
        f"- judge: `{run['judge']}` (helpfulness: reference-answer match); "
        f"max_new_tokens: {run['max_new_tokens']}; "
        f"seed: {run['seed']}; extra settings: `{run['settings']}`",
        f"- questions: {counts.get('harmful', '?')} harmful, {counts.get('benign', '?')} benign, "
        f"{counts.get('qa', '?')} helpfulness, {counts.get('tool', 0)} benign tool turns",
        "",
        'Rates leave out undecided verdicts (counted separately). "vs vanilla" is helpfulness relative to '
        "vanilla's; fluency is the perplexity of each answer under the unsteered model. An answer repeats itself "
        "when some three-word sequence occurs three or more times in it.",
        "",
        "## Headline",
        "",
        *_headline_table(modes),
        "",
    ]
    tool = [(mode, m["tool"]) for mode, m in modes.items() if m.get("tool", {}).get("n")]
    if tool:
        out += ["## Benign agent and tool turns", "", "| mode | refused |", "|---|---|"]
        out += [f"| {mode} | {_pct(t['over_refusal_rate'])} ({t['refused']}/{t['n']}) |" for mode, t in tool]
        out += [""]
    framings = summary.get("framings") or {}
    if len(framings) > 1 or set(framings) - {"bare"}:
        out += ["## By framing", "", *_framing_table(framings), ""]
        if FRAMINGS_PLOT in images:
            out += [f"![per framing]({FRAMINGS_PLOT})", ""]
    for name, kind, field, title in PLOTS:
        out += [f"## {title}", "", *_category_table(modes, kind, field), ""]
        if name in images:
            out += [f"![{title}]({name})", ""]
    if OVERVIEW in images:
        out += ["## Overview", "", f"![overview]({OVERVIEW})", ""]
    return "\n".join(out)


def write_report(summary: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write the PNG plots and ``report.md`` into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for name, kind, field, title in PLOTS:
        if plot_grouped(summary["modes"], kind, field, title, out / name) is not None:
            images.append(name)
    if summary["modes"]:
        plot_overview(summary["modes"], out / OVERVIEW)
        images.append(OVERVIEW)
    if len(summary.get("framings") or {}) > 1:
        plot_framings(summary["framings"], out / FRAMINGS_PLOT)
        images.append(FRAMINGS_PLOT)
    path = out / "report.md"
    path.write_text(render_markdown(summary, images), encoding="utf-8")
    return path
