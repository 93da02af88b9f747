"""Training curves as PNG."""

from pathlib import Path

import numpy as np


def plot_curves(history: list[dict], path: str | Path, keys: tuple[str, ...] = ("loss",), title: str = "") -> None:
    """Plot `keys` of a list of {"step": ..., key: ...} records against step (log scale for losses); records
    {"step": ..., "resumed": True} (a restart from a checkpoint) show as dotted vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key in keys:
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            steps, values = np.array(points).T
            ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
    for i, step in enumerate(r["step"] for r in history if r.get("resumed")):
        ax.axvline(step, color="grey", linestyle=":", label="resumed" if i == 0 else None)
    ax.set_xlabel("step")
    if all(v > 0 for r in history for k, v in r.items() if k in keys):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
