"""Learning curves of a run: clean and robust (PGD-10 on the fixed test subset) accuracy per peer."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoint import atomic_write  # noqa: E402


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    if not records:
        return
    epochs = [r["epoch"] for r in records]
    peers = list(records[0]["peers"])
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, p in enumerate(peers):
        color = f"C{i}"
        ax_acc.plot(epochs, [r["peers"][p]["clean_acc"] for r in records], "-o", color=color, ms=3,
                    label=f"{p} clean")
        ax_acc.plot(epochs, [r["peers"][p]["pgd10_acc"] for r in records], "--s", color=color, ms=3,
                    label=f"{p} PGD-10")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy on the fixed test subset")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    ax_loss.plot(epochs, [r["loss"] for r in records], "-o", ms=3, color="k")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss (cohort total)")
    ax_loss.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()

    def write(f):
        fig.savefig(f, format="png", dpi=110)

    atomic_write(Path(path), write)
    plt.close(fig)
