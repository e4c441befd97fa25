"""A run directory: ``config.yaml``, ``metrics.jsonl``, ``final.json``, ``checkpoint.pt``, ``curves.png``;
and ``load_cohort``, which rebuilds a run's trained peers for any attack library."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CHECKPOINT_NAME, atomic_write, load_checkpoint, load_model_state
from .config import read_yaml
from .errors import FastcollabError
from .methods import get_method
from .models import create_model

CONFIG, METRICS, FINAL, CURVES = "config.yaml", "metrics.jsonl", "final.json", "curves.png"


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
    return {p: create_model(arch, num_classes=num_classes, normalize=normalize)
            for p, arch in peer_architectures(config, names).items()}


def read_run_config(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FastcollabError(f"{run_dir} is not a fastcollab run directory (no {CONFIG}): pass the --out "
                              "directory of a python -m fastcollab.train run")
    return read_yaml(run_dir / CONFIG)


def load_run_models(run_dir: str | Path, device="cpu") -> tuple[dict, dict[str, nn.Module]]:
    """``(config, {peer: model})`` of a run's trainable peers, weights from its checkpoint, eval mode."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    ckpt = load_checkpoint(run_dir / CHECKPOINT_NAME)
    method = get_method(config["method"])(config)
    models = build_peer_models(config, method, int(config["num_classes"]))
    for name, model in models.items():
        if name not in ckpt["models"]:
            raise FastcollabError(f"checkpoint of {run_dir} has no weights for peer {name!r}: it belongs to "
                                  "another configuration; retrain the run")
        load_model_state(model, ckpt["models"][name], str(run_dir / CHECKPOINT_NAME))
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
