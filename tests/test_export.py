"""python -m fastcollab.export: every format round-trips to identical logits."""
import numpy as np
import pytest
import torch

from conftest import train_cli
from fastcollab import load_cohort
from fastcollab.errors import FastcollabError
from fastcollab.export import export_model, main as export_main
from fastcollab.models import create_model
from fastcollab.teachers import load_teacher


@pytest.fixture(scope="module")
def wrn_run(mini_npz, tmp_path_factory):
    """A small WRN (normalisation inside) trained for one short epoch: BN statistics are not their defaults."""
    d = np.load(mini_npz)
    tmp = tmp_path_factory.mktemp("export")
    data = tmp / "tiny.npz"
    np.savez(data, x_train=d["x_train"][:64], y_train=d["y_train"][:64], x_test=d["x_test"][:16],
             y_test=d["y_test"][:16])
    out = tmp / "run"
    train_cli("--method", "nat", "--model", "wrn-10-2", "--normalize", "--dataset", f"npz:{data}", "--epochs", "1",
              "--batch-size", "32", "--eval-subset", "8", "--final-eval-size", "8", "--final-attacks", "clean",
              "--device", "cpu", "--out", str(out))
    return out


X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_every_format_round_trips_with_identical_logits(wrn_run, tmp_path, capsys):
    (peer,) = load_cohort(wrn_run)
    assert not torch.all(peer.normalize.std == 1)  # --normalize: the exports must carry it
    with torch.no_grad():
        want = peer(X)
    assert export_main(["--run", str(wrn_run), "--format", "safetensors", "--out", str(tmp_path / "p.safetensors")]) == 0
    assert "exported" in capsys.readouterr().out
    t = load_teacher(str(tmp_path / "p.safetensors"), num_classes=10)  # architecture from the file's metadata
    assert export_main(["--run", str(wrn_run), "--peer", "p0", "--format", "robustbench",
                        "--out", str(tmp_path / "rb.pt")]) == 0
    rb = torch.load(tmp_path / "rb.pt", weights_only=True)["state_dict"]
    assert "block1.layer.0.convShortcut.weight" in rb and "mu" in rb and "sigma" in rb
    t_rb = load_teacher(str(tmp_path / "rb.pt"), num_classes=10, arch="wrn-10-2")
    assert export_main(["--run", str(wrn_run), "--format", "torchscript", "--out", str(tmp_path / "ts.pt")]) == 0
    ts = torch.jit.load(str(tmp_path / "ts.pt"))
    with torch.no_grad():
        assert torch.equal(t(X), want) and torch.equal(t_rb(X), want) and torch.equal(ts(X), want)
    assert not ts.training


def test_export_errors(wrn_run, tmp_path, capsys):
    assert export_main(["--run", str(wrn_run), "--peer", "p5", "--format", "safetensors",
                        "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no peer 'p5'" in capsys.readouterr().err
    assert export_main(["--run", str(tmp_path / "none"), "--format", "safetensors", "--out", str(tmp_path / "y")]) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(FastcollabError, match="RobustBench has no counterpart of smallcnn"):
        export_model(create_model("smallcnn"), "robustbench", tmp_path / "s.pt")
    assert not (tmp_path / "s.pt").exists()
