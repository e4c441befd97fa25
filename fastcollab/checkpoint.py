"""Checkpoints: written atomically, loaded with ``weights_only=True`` (a checkpoint never executes code).

A checkpoint holds the trainable peers' weights, their optimizers, the GradScaler, the RNG states, the epoch
just finished and the metrics history, so that ``--resume`` continues a killed run and ends exactly where an
uninterrupted run would.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import FastcollabError

FORMAT = "fastcollab-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"  # --select best-pgd: the selected epoch, in the checkpoint format
TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Write through ``write(file_object)`` into a temporary file beside ``path``, fsync, then rename.

    The result has the permissions of any new file (0666 less the umask, not mkstemp's 0600). A filesystem
    failure (read-only, disk full, a file where a folder should be) is one :class:`FastcollabError`; the
    previous version of ``path`` is left intact and the temporary file removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise FastcollabError(f"cannot write {path} ({e.strerror or e}): free disk space or pick a writable "
                              "folder; the previous version of the file is unchanged") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` of any of ``names`` left in ``folder`` (call
    it only while no other process writes there, i.e. holding the run's lock)."""
    stale = sorted(p for n in names for p in Path(folder).glob(f".{n}.*{TMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, epoch: int, models: dict, optimizers: dict, scaler, metrics: list,
                    config: dict) -> None:
    payload = {
        "format": FORMAT,
        "epoch": epoch,
        "models": {n: {k: v.detach().cpu() for k, v in m.state_dict().items()} for n, m in models.items()},
        "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "metrics": metrics,
        "config": config,
    }
    buffer = io.BytesIO()  # serialised first: a full disk is then an OSError of the write, not a torch error
    torch.save(payload, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def monitored_robust_acc(record: dict, peer: str) -> float:
    """A metrics record's accuracy of ``peer`` under the per-epoch monitor attack (``--monitor-attack``;
    records written before the flag existed monitored PGD-10)."""
    return record["peers"][peer][f"{record.get('monitor_attack', 'pgd10')}_acc"]


def best_of(metrics: list[dict]) -> tuple[int, float] | None:
    """``(epoch, score)`` of the best epoch by mean validation accuracy under the monitor attack over the peers
    (``--select best-pgd``); the earliest epoch wins a tie. None while no epoch was validated."""
    scored = [(r["epoch"], sum(monitored_robust_acc(r, p) for p in r["peers"]) / len(r["peers"]))
              for r in metrics if r.get("monitor") == "val"]
    return max(scored, key=lambda es: (es[1], -es[0])) if scored else None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FastcollabError(f"no checkpoint at {path}: train the run first, or point --run/--out at a run "
                              f"directory that holds {CHECKPOINT_NAME}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise FastcollabError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:120]}): it is "
                              "corrupt or not a fastcollab checkpoint; delete it and train again without "
                              "--resume, or point at another run") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FastcollabError(f"{path} is not a fastcollab checkpoint (format {FORMAT} expected): point at a "
                              "run directory written by python -m fastcollab.train")
    return payload


def load_model_state(model: torch.nn.Module, state: dict, where: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:200]
        raise FastcollabError(f"the weights in {where} do not fit the model of its config ({first}): the "
                              "checkpoint and config.yaml disagree; retrain or restore the run's config.yaml") from None
