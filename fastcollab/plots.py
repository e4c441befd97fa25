"""Plots of a run: learning curves (clean and PGD-10 accuracy per epoch) and robustness curves (accuracy vs ε
per peer and norm, chance level marked)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoint import atomic_write, monitored_robust_acc  # noqa: E402


def save_png(fig, path: Path) -> None:
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


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
        ax_acc.plot(epochs, [monitored_robust_acc(r, p) for r in records], "--s", color=color, ms=3,
                    label=f"{p} {records[-1].get('monitor_attack', 'pgd10')}")
    held_out = records[-1].get("monitor") == "val"
    ax_acc.set(xlabel="epoch", ylabel=f"{'validation' if held_out else 'test'} accuracy (%)",
               title=f"accuracy on the fixed {'held-out training' if held_out else 'test'} subset")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    ax_loss.plot(epochs, [r["loss"] for r in records], "-o", ms=3, color="k")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss (cohort total)")
    ax_loss.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)


def plot_eps_curves(sweeps: dict[str, dict[str, dict]], num_classes: int, path: Path, title: str) -> None:
    """``sweeps``: ``{peer: {norm: {"eps": [...], "accuracy": [...]}}}`` (the ε sweep of the checks); one
    panel per norm, one line per peer, the chance level dashed. The ε grid {0, ε/4, ε/2, ε, 2ε, 4ε, the whole
    box} is drawn at equal spacing, each tick labelled with its value."""
    from .evaluation.runner import eps_text

    norms = list(dict.fromkeys(nm for per in sweeps.values() for nm in per))
    if not norms:
        return
    fig, axes = plt.subplots(1, len(norms), figsize=(5.5 * len(norms), 4), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        first = next(per[norm] for per in sweeps.values() if norm in per)
        ticks = list(range(len(first["eps"])))
        for i, (peer, per) in enumerate(sweeps.items()):
            if norm in per:
                ax.plot(ticks, per[norm]["accuracy"], "-o", ms=3, color=f"C{i}", label=peer)
        ax.axhline(100.0 / num_classes, color="grey", ls="--", lw=1, label=f"chance ({100.0 / num_classes:.1f} %)")
        labels = [eps_text(e) if e else "0" for e in first["eps"]]
        labels[-1] += "\n(box)"
        ax.set_xticks(ticks, labels, fontsize=8)
        ax.set(xlabel=f"ε ({norm})", ylabel="accuracy (%)",
               title=f"{norm}: {first.get('attack', 'PGD')} on {first.get('n', '?')} images", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)
