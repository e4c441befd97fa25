"""Shared fixtures: the real CIFAR-10 subset from ../shared/data and small slices of it."""
from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter mode when it is first imported: set it before any test module imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_mini.npz"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mini_npz() -> Path:
    if not MINI.is_file():
        pytest.skip(f"real-data test: {MINI} is absent")
    return MINI


@pytest.fixture(scope="session")
def small_npz(mini_npz, tmp_path_factory) -> Path:
    """The first 512 training and 128 test images of cifar10_mini: short end-to-end runs."""
    d = np.load(mini_npz)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x_train=d["x_train"][:512], y_train=d["y_train"][:512],
             x_test=d["x_test"][:128], y_test=d["y_test"][:128])
    return path


def train_cli(*args: str) -> None:
    """Run ``python -m fastcollab.train`` in-process; fail the test with its message if it fails."""
    from fastcollab.train import main

    rc = main(["--no-progress", *args])
    assert rc == 0, f"fastcollab.train {' '.join(args)} exited with {rc}"


@pytest.fixture(scope="session")
def nat_run(mini_npz, tmp_path_factory) -> Path:
    """A naturally trained smallcnn on cifar10_mini (3 epochs): a real, non-trivial classifier."""
    out = tmp_path_factory.mktemp("runs") / "nat"
    train_cli("--method", "nat", "--model", "smallcnn", "--dataset", f"npz:{mini_npz}", "--epochs", "3",
              "--lr", "0.05", "--eval-subset", "64", "--final-eval-size", "128", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def trained_nat_model(nat_run):
    from fastcollab import load_cohort

    (model,) = load_cohort(nat_run)
    return model


@pytest.fixture(scope="session")
def mini_test_batch(mini_npz):
    d = np.load(mini_npz)
    return torch.from_numpy(d["x_test"][:256]).float() / 255, torch.from_numpy(d["y_test"][:256]).long()
