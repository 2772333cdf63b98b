"""PNG plots for ``soupkit eval``: scores with intervals, and reward against KL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soupkit.diagnostics.plots import pyplot


def scores_plot(results: dict[str, Any], key: str, out: Path) -> Path:
    """Mean ``key`` per method with its 95% interval as error bars."""
    plt = pyplot()
    names = list(results["methods"])
    values = [results["methods"][n][key] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.2))
    ax.bar(range(len(names)), [v[0] for v in values], color="#7aa6c2",
           yerr=[[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]], capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(f"mean {key} (95% CI)")
    ax.axhline(0, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def frontier_plot(results: dict[str, Any], out: Path) -> Path:
    """Score against KL, one line per method across the kl_coef sweep."""
    plt = pyplot()
    front = results["frontier"]
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for i, (method, curve) in enumerate(front["curves"].items()):
        color = f"C{i}"
        ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="o", color=color, label=method)
        for entry in (e for e in results["methods"].values() if e["method"] == method):
            x, y = entry[front["kl"]], entry[front["score"]]
            ax.errorbar(x[0], y[0], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                        color=color, alpha=0.5, capsize=3)
    ax.set_xlabel(f"{front['kl']} (nats per response)")
    ax.set_ylabel(f"mean {front['score']}")
    ax.legend(fontsize=8, loc="best")
    ax.set_title("95% intervals; lines join each method's kl_coef sweep", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def ablation_plot(results: dict[str, Any], sweep: str, out: Path) -> Path:
    """The score and the win rate against the swept value, with 95% intervals, one line per kl_coef."""
    plt = pyplot()
    table = results["ablation"][sweep]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    for ax, key, label in ((axes[0], table["score"], f"mean {table['score']}"),
                           (axes[1], "win_rate", f"win rate vs {results['baseline']}")):
        for i, coef in enumerate(sorted({r["kl_coef"] for r in table["rows"]})):
            rows = [r for r in table["rows"] if r["kl_coef"] == coef and r[key]]
            ax.errorbar([r["value"] for r in rows], [r[key][0] for r in rows], capsize=3, marker="o", color=f"C{i}",
                        yerr=[[r[key][0] - r[key][1] for r in rows], [r[key][2] - r[key][0] for r in rows]],
                        label=f"kl_coef {coef:g}")
        ax.set_xlabel(table["axis"])
        ax.set_ylabel(f"{label} (95% CI)")
    axes[1].axhline(0.5, color="grey", lw=0.5)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"soups of {table['sweep']} over {table['axis']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_eval_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    figures = [scores_plot(results, results["primary"], out_dir / f"{results['primary']}.png")]
    if results["primary"] != "reward":
        figures.append(scores_plot(results, "reward", out_dir / "reward.png"))
    if results.get("frontier"):
        figures.append(frontier_plot(results, out_dir / "reward_vs_kl.png"))
    for sweep in results.get("ablation") or {}:
        figures.append(ablation_plot(results, sweep, out_dir / f"ablation-{sweep}.png"))
    if results.get("path"):
        from soupkit.diagnostics.plots import path_plot

        path_plot(results["path"], out_dir / "path.png")
        figures.append(out_dir / "path.png")
    return figures
