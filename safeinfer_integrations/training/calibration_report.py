"""The calibration table's files: ``calibration.json``, ``calibration.csv`` and the ``calibration.png`` plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def write_table(table: dict[str, Any], directory: Path) -> list[Path]:
    """Write calibration.json, calibration.csv and calibration.png into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "calibration.json"
    json_path.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    csv_path = directory / "calibration.csv"
    fields = list(table["rows"][0].keys())
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in table["rows"]:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return [json_path, csv_path, plot_table(table, directory / "calibration.png")]


def plot_table(table: dict[str, Any], path: Path) -> Path:
    """Refusal, over-refusal and perplexity against scale, one line per layer; solid = gate on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if r["mode"] == "sa"]
    base = table["baseline"]
    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    metrics = (
        ("refusal", "refusal rate on harmful (higher is better)"),
        ("over_refusal", "over-refusal on benign (lower is better)"),
        ("perplexity", "answer perplexity, unsteered model (lower is better)"),
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = sorted(
        {(r["layer"], r["gate"], r.get("gate_sharpness") or "") for r in rows}, key=lambda x: (x[0], not x[1], x[2])
    )
    sharp_styles = {
        label: style
        for label, style in zip(
            sorted({x[2] for x in lines if x[1]}, key=lambda lab: lab != "1:0"), ("-", "-.", (0, (5, 1)), ":")
        )
    }
    for axis, (key, title) in zip(axes, metrics):
        for layer, gate, sharp in lines:
            points = sorted(
                (r["scale"], r[key])
                for r in rows
                if r["layer"] == layer and r["gate"] == gate and (r.get("gate_sharpness") or "") == sharp
            )
            style = sharp_styles.get(sharp, "-") if gate else "--"
            label = f"layer {layer}, gate " + (
                f"on (sharpness {sharp})" if gate and sharp not in ("", "1:0") else "on" if gate else "off"
            )
            axis.plot(
                *zip(*points), linestyle=style, marker="o", color=colors[layers.index(layer) % len(colors)], label=label
            )
        axis.axhline(base[key], color="grey", linestyle=":", label="unsteered")
        chosen = table["chosen"]
        axis.plot(
            [chosen["scale"]], [chosen[key]], marker="*", markersize=16, color="black", linestyle="none", label="chosen"
        )
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("scale")
        if key == "perplexity":
            axis.set_yscale("log")
    axes[0].legend(fontsize=7, loc="best")
    framed = " (half in retrieval, agent and conversation framings)" if table["split"].get("framed") else ""
    fig.suptitle(
        f"Calibration of the safety vector for {table['model_name']} on the held-in split: "
        f"{table['split']['n_harmful']} harmful, {table['split']['n_benign']} benign prompts{framed}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
