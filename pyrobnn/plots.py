"""Plots people would rather look at than read: learning curves and reliability diagrams (PNG)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .metrics import reliability  # noqa: E402

__all__ = ["plot_learning_curves", "plot_reliability", "savefig"]


def savefig(fig, path):
    """Write a matplotlib figure to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_learning_curves(history, path):
    """ELBO per datum and validation metrics per epoch."""
    recs = history.records if hasattr(history, "records") else history
    epochs = [r["epoch"] for r in recs]
    val_keys = [k for k in recs[0] if k.startswith("val_")] if recs else []
    n = 1 + len(val_keys)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2))
    axes = [axes] if n == 1 else list(axes)
    axes[0].plot(epochs, [r["elbo_per_datum"] for r in recs], marker=".")
    axes[0].set(title="ELBO per datum (train)", xlabel="epoch")
    for ax, k in zip(axes[1:], val_keys):
        ax.plot(epochs, [r[k] for r in recs], marker=".", color="C1")
        ax.set(title=k, xlabel="epoch")
    fig.tight_layout()
    savefig(fig, path)


def plot_reliability(probs_by_name: dict, y: torch.Tensor, path, num_bins: int = 15):
    """Reliability diagram (accuracy vs confidence per bin) for one or more predictives."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for i, (name, probs) in enumerate(probs_by_name.items()):
        conf, acc, count = reliability(probs, y, num_bins)
        keep = count > 0
        ax.plot(conf[keep].numpy(), acc[keep].numpy(), marker="o", color=f"C{i}", label=name)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability")
    ax.legend(loc="upper left", fontsize=8)
    savefig(fig, path)
