"""A run directory: ``config.yaml``, ``metrics.jsonl``, ``final.json``, ``checkpoint.pt``, ``curves.png``;
its protection (:func:`check_out_folder`, :class:`RunLock`); and ``load_cohort``, which rebuilds a run's
trained peers for any attack library."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (BEST_NAME, CHECKPOINT_NAME, TMP_SUFFIX, atomic_write, load_checkpoint, load_model_state,
                         remove_stale_temporaries)
from .config import pick_device, read_yaml
from .errors import FastcollabError
from .methods import get_method
from .models import create_model

CONFIG, METRICS, FINAL, CURVES = "config.yaml", "metrics.jsonl", "final.json", "curves.png"
LOCK = ".fastcollab.lock"
# everything a run writes (final.partial.json: the resumable final evaluation; final_eps_curves.png beside it)
RUN_FILES = (CONFIG, METRICS, FINAL, CURVES, CHECKPOINT_NAME, BEST_NAME, "final.partial.json",
             "final_eps_curves.png")


def check_out_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """``--out`` must be new, empty, or (with ``--resume``) a run; anything else needs ``--overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FastcollabError(f"--out {out} is a file, not a folder: pass a new folder path")
    if resume or overwrite or not out.exists():
        return
    entries = sorted(p.name for p in out.iterdir() if not _is_leftover(p.name))
    if not entries:
        return
    if (out / CONFIG).is_file():
        raise FastcollabError(f"{out} already holds a run: pass --resume to continue it, --overwrite to replace "
                              "it, or another --out")
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise FastcollabError(f"--out {out} is not empty ({len(entries)} entries: {shown}): pass a new or empty "
                          "folder, or --overwrite to write the run into it anyway")


def _is_leftover(name: str) -> bool:
    """A lock or a temporary checkpoint/result file of a killed run: not the user's data."""
    return name == LOCK or any(name.startswith(f".{f}.") and name.endswith(TMP_SUFFIX) for f in RUN_FILES)


def run_status(out: Path) -> str | None:
    """The ``status`` of a run's final.json (``ok``, ``diverged``), or None while it has none."""
    try:
        return json.loads((Path(out) / FINAL).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


class RunLock:
    """``.fastcollab.lock`` (pid and host) in a run folder: one live run per folder. A lock whose process
    is gone (a killed run, same host) is stale and taken over; on taking the lock the temporary files a
    killed checkpoint write left behind are removed."""

    def __init__(self, out: Path):
        self.out, self.path, self.held = Path(out), Path(out) / LOCK, False

    def acquire(self) -> "RunLock":
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                except FileExistsError:
                    self._refuse_if_live()
                    self.path.unlink(missing_ok=True)  # stale: its run is dead
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()} {socket.gethostname()}\n")
                self.held = True
                break
        except OSError as e:
            raise FastcollabError(f"cannot write into --out {self.out} ({e.strerror or e}): pick a writable "
                                  "folder") from None
        if not self.held:
            raise FastcollabError(f"another run took the lock of {self.out} at the same moment: use another --out")
        remove_stale_temporaries(self.out, RUN_FILES)
        return self

    def _refuse_if_live(self) -> None:
        try:
            pid_text, host = self.path.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):  # empty or half written: being written right now, or its writer died
            try:
                fresh = time.time() - self.path.stat().st_mtime < 10
            except OSError:
                return
            if fresh:
                raise FastcollabError(f"another run is taking the lock of {self.out} right now: use another --out")
            return
        if host != socket.gethostname():
            raise FastcollabError(f"{self.out} is in use by a run on host {host} (pid {pid}): wait for it, or "
                                  f"delete {self.path} if that run is dead")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass  # alive, another user's
        raise FastcollabError(f"{self.out} is in use by a live run (pid {pid}): wait for it to end, or use "
                              "another --out")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def peer_architectures(config: dict, peer_names: list[str]) -> dict[str, str]:
    """``--model NAME`` for every peer, or ``--model A,B,...`` one per trainable peer."""
    archs = [a.strip() for a in str(config["model"]).split(",") if a.strip()]
    if len(archs) == 1:
        return {p: archs[0] for p in peer_names}
    if len(archs) != len(peer_names):
        raise FastcollabError(f"--model lists {len(archs)} architectures for {len(peer_names)} trainable peers "
                              f"({', '.join(peer_names)}): give one name, or one per peer")
    return dict(zip(peer_names, archs))


def build_peer_models(config: dict, method, num_classes: int, mean=None, std=None) -> dict[str, nn.Module]:
    """Fresh models for the method's trainable peers (normalisation inside the model if asked)."""
    names = method.trainable_peers()
    normalize = (tuple(mean), tuple(std)) if config.get("normalize") and mean is not None else None
    image_size = int(config.get("image_size", 32))  # set by the trainer from the dataset (runs before it: 32)
    return {p: create_model(arch, num_classes=num_classes, normalize=normalize, image_size=image_size)
            for p, arch in peer_architectures(config, names).items()}


def read_run_config(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FastcollabError(f"{run_dir} is not a fastcollab run directory (no {CONFIG}): pass the --out "
                              "directory of a python -m fastcollab.train run")
    return read_yaml(run_dir / CONFIG)


def load_run_models(run_dir: str | Path, device="cpu") -> tuple[dict, dict[str, nn.Module]]:
    """``(config, {peer: model})`` of a run's trainable peers, eval mode; the weights of the epoch its
    final evaluation used: the last (checkpoint.pt), or with ``--select best-pgd`` the selected one (best.pt)."""
    run_dir = Path(run_dir)
    device = pick_device(device, "device")
    config = read_run_config(run_dir)
    name = BEST_NAME if config.get("select") == "best-pgd" else CHECKPOINT_NAME
    ckpt = load_checkpoint(run_dir / name)
    method = get_method(config["method"])(config)
    models = build_peer_models(config, method, int(config["num_classes"]))
    for name, model in models.items():
        if name not in ckpt["models"]:
            raise FastcollabError(f"checkpoint of {run_dir} has no weights for peer {name!r}: it belongs to "
                                  "another configuration; retrain the run")
        load_model_state(model, ckpt["models"][name], str(run_dir / name))
        model.to(device).eval()
    return config, models


def load_cohort(run_dir: str | Path, device: str | torch.device = "cpu") -> list[nn.Module]:
    """The trained peers of a run, in peer order: each in eval mode on ``device``, taking NCHW floats in
    [0, 1] and returning logits ``[N, classes]`` (the contract of torchattacks, AutoAttack, RobustBench)."""
    return list(load_run_models(run_dir, device)[1].values())


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(Path(run_dir) / METRICS, lambda f: f.write(text.encode()))


def write_json(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=2) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()))
