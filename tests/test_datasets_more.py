"""SVHN (.mat), Tiny-ImageNet (folder of JPEGs), CIFAR-100 end to end, label validation and the 64x64 stem,
all on small generated fixtures in the official layouts (never the real data)."""
import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fastcollab.data as data
from conftest import train_cli
from fastcollab import load_cohort
from fastcollab.data import load_dataset
from fastcollab.errors import FastcollabError
from fastcollab.models import create_model, list_models

FAST = ["--model", "smallcnn", "--method", "nat", "--epochs", "1", "--batch-size", "16", "--eval-subset", "8",
        "--final-eval-size", "8", "--final-attacks", "clean,pgd2", "--device", "cpu"]


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# ------------------------------------------------------------------------------------------------ SVHN

def _svhn_mat(path: Path, n: int, seed: int, labels=None) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1 if labels is None else np.asarray(labels)).astype(np.float64).reshape(n, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"X": x, "y": y})  # MATLAB v5, as the official files
    return x, y


def test_svhn_reads_official_mat_layout(tmp_path):
    x, y = _svhn_mat(tmp_path / "svhn" / "train_32x32.mat", 20, 0)
    _svhn_mat(tmp_path / "svhn" / "test_32x32.mat", 10, 1)
    ds = load_dataset("svhn", data_dir=tmp_path, download=False)
    assert ds.name == "svhn" and ds.num_classes == 10 and ds.x_train.shape == (20, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.y_train, torch.from_numpy(y.reshape(-1).astype(np.int64) % 10))  # 10 -> digit 0
    assert ds.y_train[9] == 0 and ds.y_train[0] == 1
    n, c, h, w = 7, 2, 5, 30
    assert ds.x_train[n, c, h, w] == x[h, w, c, n]


def test_svhn_absent_or_bad_is_one_line(tmp_path):
    with pytest.raises(FastcollabError) as e:
        load_dataset("svhn", data_dir=tmp_path, download=False)
    msg = _one_line(e)
    assert "train_32x32.mat" in msg and "test_32x32.mat" in msg and str(tmp_path / "svhn") in msg
    assert "http://ufldl.stanford.edu/housenumbers/" in msg
    _svhn_mat(tmp_path / "svhn" / "train_32x32.mat", 10, 0, labels=[1] * 9 + [11])
    _svhn_mat(tmp_path / "svhn" / "test_32x32.mat", 10, 1)
    with pytest.raises(FastcollabError) as e:
        load_dataset("svhn", data_dir=tmp_path, download=False)
    assert "1 labels outside 1..10: 11" in _one_line(e)


def test_svhn_download_verifies_md5(tmp_path, monkeypatch):
    blobs = {}
    for split, seed in (("train", 0), ("test", 1)):
        _svhn_mat(tmp_path / "src" / f"{split}_32x32.mat", 10, seed)
        blobs[f"{split}_32x32.mat"] = (tmp_path / "src" / f"{split}_32x32.mat").read_bytes()
    calls = []

    def opener(url, timeout=None):
        calls.append(url)
        return io.BytesIO(blobs[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(data, "_urlopen", opener)
    root = tmp_path / "data"
    with pytest.raises(FastcollabError) as e:  # the official md5 does not match the fixture
        load_dataset("svhn", data_dir=root)
    assert "failed its md5 check" in _one_line(e) and not any((root / "svhn").iterdir())
    files = {s: (name, hashlib.md5(blobs[name]).hexdigest()) for s, (name, _) in data._SVHN["files"].items()}
    monkeypatch.setitem(data._SVHN, "files", files)
    ds = load_dataset("svhn", data_dir=root)
    assert ds.x_train.shape == (10, 3, 32, 32) and sorted(p.name for p in (root / "svhn").iterdir()) == [
        "test_32x32.mat", "train_32x32.mat"]
    assert calls[-2:] == ["http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                          "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"]


def test_official_checksums():
    assert data._SVHN["files"]["train"] == ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373")
    assert data._SVHN["files"]["test"] == ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")
    assert data._TINY["md5"] == "90528d7ca1a48142e341f4ef8d21d0de"


# ------------------------------------------------------------------------------------------------ Tiny-ImageNet

def _tiny_tree(root: Path, n_val=6) -> list[str]:
    """The official layout with 200 classes, one training JPEG each (one grayscale), n_val validation JPEGs."""
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    wnids = [f"n{10_000_000 + 7 * i:08d}" for i in range(200)][::-1]  # wnids.txt is not sorted
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for i, w in enumerate(wnids):
        d = folder / "train" / w / "images"
        d.mkdir(parents=True)
        a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        img = Image.fromarray(a[:, :, 0], "L") if i == 0 else Image.fromarray(a)
        img.save(d / f"{w}_0.JPEG", quality=95)
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for j in range(n_val):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            folder / "val" / "images" / f"val_{j}.JPEG")
        lines.append(f"val_{j}.JPEG\t{wnids[j * 3]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids


def test_tiny_imagenet_reads_official_layout_and_caches(tmp_path):
    wnids = _tiny_tree(tmp_path)
    ds = load_dataset("tiny-imagenet", data_dir=tmp_path, download=False)
    assert ds.num_classes == 200 and ds.x_train.shape == (200, 3, 64, 64) and ds.x_test.shape == (6, 3, 64, 64)
    order = sorted(wnids)
    assert torch.equal(ds.y_train, torch.arange(200))  # class k = k-th wnid in sorted order
    assert ds.y_test.tolist() == [order.index(wnids[j * 3]) for j in range(6)]
    gray = ds.x_train[order.index(wnids[0])]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])  # grayscale converted to RGB
    assert (tmp_path / "tiny-imagenet-200" / "fastcollab-uint8.npz").is_file()
    again = load_dataset("tiny-imagenet", data_dir=tmp_path, download=False)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_tiny_imagenet_absent_or_broken(tmp_path):
    with pytest.raises(FastcollabError) as e:
        load_dataset("tiny-imagenet", data_dir=tmp_path, download=False)
    msg = _one_line(e)
    assert str(tmp_path / "tiny-imagenet-200") in msg and "wnids.txt" in msg and "val/val_annotations.txt" in msg
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in msg
    _tiny_tree(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\n")
    with pytest.raises(FastcollabError) as e:
        load_dataset("tiny-imagenet", data_dir=tmp_path, download=False)
    assert "line 1" in _one_line(e) and "wnids.txt" in _one_line(e)


def test_tiny_imagenet_download_extracts_zip(tmp_path, monkeypatch):
    _tiny_tree(tmp_path / "src", n_val=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted((tmp_path / "src").rglob("*")):
            z.write(p, p.relative_to(tmp_path / "src").as_posix())
    blob = buf.getvalue()
    monkeypatch.setattr(data, "_urlopen", lambda url, timeout=None: io.BytesIO(blob))
    monkeypatch.setitem(data._TINY, "md5", hashlib.md5(blob).hexdigest())
    ds = load_dataset("tiny-imagenet", data_dir=tmp_path / "data")
    assert ds.x_test.shape == (2, 3, 64, 64)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["tiny-imagenet-200"]


def test_tiny_imagenet_trains_end_to_end_with_64px_stem(tmp_path):
    _tiny_tree(tmp_path / "data", n_val=8)
    out = tmp_path / "run"
    train_cli("--dataset", "tiny-imagenet", "--data-dir", str(tmp_path / "data"), *FAST, "--out", str(out))
    final = json.loads((out / "final.json").read_text())
    assert final["dataset"] == "tiny-imagenet" and final["test_images"] == 8
    (model,) = load_cohort(out)
    assert model.image_size == 64 and model.features[0][0].stride == (2, 2) and model.fc.out_features == 200


# ------------------------------------------------------------------------------------------------ CIFAR-100

def test_cifar100_trains_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 32), ("test", 8)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                 b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    out = tmp_path / "run"
    train_cli("--dataset", "cifar100", "--data-dir", str(tmp_path), *FAST, "--out", str(out))
    assert json.loads((out / "final.json").read_text())["dataset"] == "cifar100"
    (model,) = load_cohort(out)
    assert model.fc.out_features == 100 and model.image_size == 32 and model.features[0][0].stride == (1, 1)


# ------------------------------------------------------------------------------------------------ labels

@pytest.mark.parametrize("stray, words", [
    (255, ["245 of the values 0..255 have no image", "1 labels lie above 9", "values 255"]),
    (10**7, ["have no image", "1 labels lie above 9", "values 10000000"]),
    (12, ["2 of the values 0..12 have no image (the first is 10)", "values 12"]),
])
def test_npz_label_gap_is_an_error_before_any_image_work(tmp_path, monkeypatch, stray, words):
    rng = np.random.default_rng(0)
    y = np.arange(30) % 10
    y[5] = stray
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (30, 3, 8, 8), dtype=np.uint8), y_train=y,
             x_test=np.zeros((2, 3, 8, 8), np.uint8), y_test=np.array([0, 1]))

    def no_images(*a, **k):
        raise AssertionError("images converted before the labels were checked")

    monkeypatch.setattr(data, "_npz_images", no_images)
    with pytest.raises(FastcollabError) as e:
        load_dataset(f"npz:{tmp_path / 'd.npz'}")
    msg = _one_line(e)
    for w in words:
        assert w in msg, (w, msg)


def test_check_labels_with_a_known_class_count():
    assert data.check_labels("x", np.array([0, 9]), np.array([3]), 10) == 10
    with pytest.raises(FastcollabError) as e:
        data.check_labels("x", np.array([0, 9, 10, 10]), np.array([12]), 10)
    assert "3 labels lie outside 0..9 (values 10, 12)" in _one_line(e)


# ------------------------------------------------------------------------------------------------ 64x64 stem

@pytest.mark.parametrize("arch", [a for a in list_models() if not a.startswith("wrn-")] + ["wrn-10-2"])
def test_models_adapt_their_stem_to_64px(arch):
    m32 = create_model(arch, num_classes=200)
    m64 = create_model(arch, num_classes=200, image_size=64)
    assert m64.image_size == 64
    stems = [next(mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)) for m in (m32, m64)]
    assert stems[0].stride == (1, 1) and stems[1].stride == (2, 2)
    m64.load_state_dict(m32.state_dict())  # same weights, only the stride differs
    seen = {}
    stems[1].register_forward_hook(lambda mod, i, o: seen.update(shape=tuple(o.shape)))  # returns None
    with torch.no_grad():
        out = m64.eval()(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 200) and seen["shape"][-2:] == (32, 32)  # the 32x32 model's first feature map
