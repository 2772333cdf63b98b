"""PNG plots of a report: per-layer distances, the path curve, the plane heat map (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soupkit.storage import atomic_output_dir


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _short(ref: str) -> str:
    return Path(ref).name or ref


def layers_plot(result: dict[str, Any], out: Path) -> None:
    """Relative L2 and cosine per decoder layer, one line per pair."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for pair in result["pairs"]:
        rows = pair["layers"]
        label = f"{_short(pair['a'])} vs {_short(pair['b'])}"
        top.plot([r["layer"] for r in rows], [r.get("relative_l2", 0) for r in rows], marker="o", label=label)
        bottom.plot([r["layer"] for r in rows], [r.get("cosine", 0) for r in rows], marker="o", label=label)
    top.set_ylabel("relative L2  ||a-b|| / ||a||")
    bottom.set_ylabel("cosine")
    bottom.set_xlabel("decoder layer")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    top.set_title("Weight distance per layer")
    top.legend(fontsize="small")
    _save(fig, out)


def path_plot(path: dict[str, Any], out: Path) -> None:
    """Loss (and reward) along alpha, with the endpoints and the chord between their losses."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    alphas, losses = path["alpha"], path["loss"]
    ax.plot(alphas, losses, marker="o", color="C0", label="loss on probe texts")
    if 0.0 in alphas and 1.0 in alphas:
        ends = [losses[alphas.index(0.0)], losses[alphas.index(1.0)]]
        ax.plot([0, 1], ends, "--", color="grey", label="chord between the models")
        ax.scatter([0, 1], ends, s=80, color="C3", zorder=3)
        for x, y, name in zip((0, 1), ends, (path["a"], path["b"])):
            ax.annotate(_short(name), (x, y), textcoords="offset points", xytext=(4, 8))
    ax.axvspan(0, 1, color="0.93", zorder=0)
    ax.set_xlabel("alpha   (weights = (1 - alpha) A + alpha B)")
    ax.set_ylabel("mean NLL per token (nats)")
    title = "Interpolation path" + (f"   barrier {path['barrier']:.4f} nats (Frankle), "
                                    f"{path['barrier_chord']:.4f} above the chord" if "barrier" in path else "")
    ax.set_title(title)
    if "reward" in path:
        twin = ax.twinx()
        twin.plot(alphas, path["reward"], marker="s", color="C2", label="mean reward")
        twin.set_ylabel("mean reward of samples", color="C2")
    ax.legend(loc="upper center", fontsize="small")
    _save(fig, out)


def plane_plot(plane: dict[str, Any], key: str, out: Path) -> None:
    """Heat map of ``plane[key]`` over (u, v), with the three models and their triangle."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    u, v = plane["u"], plane["v"]
    half = (u[1] - u[0]) / 2
    image = ax.imshow(plane[key], origin="lower", cmap="viridis" if key == "reward" else "viridis_r",
                      extent=(u[0] - half, u[-1] + half, v[0] - half, v[-1] + half), aspect="equal")
    fig.colorbar(image, ax=ax, label="mean reward" if key == "reward" else "loss (nats)")
    ax.plot([0, 1, 0, 0], [0, 0, 1, 0], color="white", lw=1.5)
    for (x, y), name in zip(((0, 0), (1, 0), (0, 1)), plane["models"]):
        ax.scatter([x], [y], color="white", edgecolor="black", s=60, zorder=3)
        ax.annotate(_short(name), (x, y), color="white", textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("u (towards B)")
    ax.set_ylabel("v (towards C)")
    ax.set_title(f"{key.capitalize()} over the plane: (1-u-v) A + u B + v C")
    _save(fig, out)


def _save(fig: Any, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def write_plots(result: dict[str, Any], out_dir: Path, force: bool = False) -> list[Path]:
    """Write ``layers.png``, and ``path.png`` / ``plane.png`` (``plane_reward.png``) when measured."""
    with atomic_output_dir(out_dir, force) as tmp:
        layers_plot(result, tmp / "layers.png")
        path = result.get("path")
        if path is not None:
            path_plot(path, tmp / "path.png")
            for key in ("loss", "reward"):
                if key in path.get("plane", {}):
                    plane_plot(path["plane"], key, tmp / ("plane.png" if key == "loss" else "plane_reward.png"))
    return sorted(out_dir.iterdir())
