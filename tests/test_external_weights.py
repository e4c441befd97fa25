"""External checkpoints (fastcollab.weights): --teacher PATH / robustbench:NAME, --init, RobustBench key layouts,
and one clear line for each kind of bad file."""
import argparse

import pytest
import torch
import yaml

from conftest import train_cli
from fastcollab import load_cohort
from fastcollab.errors import FastcollabError
from fastcollab.models import create_model
from fastcollab.teachers import load_teacher
from fastcollab.train import main as train_main
from fastcollab.weights import load_weights, parse_normalize, read_state_dict, warm_start


def _perturbed(arch, num_classes=10, seed=0):
    """A model whose BN statistics and affine parameters are not their defaults (so a missed key shows)."""
    torch.manual_seed(seed)
    m = create_model(arch, num_classes=num_classes)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize("layout", ["bare", "module", "orig_mod", "state_dict", "model_state_dict", "model", "net",
                                    "safetensors"])
def test_common_layouts_give_identical_logits(tmp_path, layout):
    m = _perturbed("smallcnn")
    sd = m.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pt")
    if layout == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif layout == "module":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif layout == "orig_mod":
        torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, path)
    elif layout == "bare":
        torch.save(sd, path)
    else:
        torch.save({layout: {f"module.{k}": v for k, v in sd.items()}, "epoch": 7, "best_acc": 51.2}, path)
    t = load_teacher(str(path), num_classes=10, arch="smallcnn")
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    with torch.no_grad():
        assert torch.equal(t(X), m(X))


def _robustbench_wrn_names(depth=10, width=2):
    """RobustBench / TRADES WideResNet key names (written out from its model definition) -> fastcollab's."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = {"conv1.weight": "conv1.weight", "fc.weight": "fc.weight", "fc.bias": "fc.bias"}
    names.update({f"bn1.{p}": f"bn.{p}" for p in bn})
    channels = [16, 16 * width, 32 * width, 64 * width]
    for g in (1, 2, 3):
        for i in range((depth - 4) // 6):
            rb, fc = f"block{g}.layer.{i}.", f"block{g}.{i}."
            for b in ("bn1", "bn2"):
                names.update({f"{rb}{b}.{p}": f"{fc}{b}.{p}" for p in bn})
            names[f"{rb}conv1.weight"] = f"{fc}conv1.weight"
            names[f"{rb}conv2.weight"] = f"{fc}conv2.weight"
            if i == 0 and channels[g - 1] != channels[g]:
                names[f"{rb}convShortcut.weight"] = f"{fc}shortcut.weight"
    return names


def test_robustbench_wideresnet_layout_maps_every_tensor(tmp_path):
    names = _robustbench_wrn_names()
    target = create_model("wrn-10-2").state_dict()
    # the hand-written correspondence covers the whole model but its input normalisation (which RobustBench's
    # plain WideResNet does not have)
    assert set(names.values()) == set(target) - {"normalize.mean", "normalize.std"}
    g = torch.Generator().manual_seed(0)
    state = {rb: (torch.rand(target[fc].shape, generator=g) + 0.5) if target[fc].is_floating_point()
             else torch.tensor(3) for rb, fc in names.items()}
    # TRADES' unused sub_block1 (in Zhang2019Theoretically's file) is dropped, not reported
    state.update({"sub_block1.layer.0.conv1.weight": torch.zeros(32, 16, 3, 3)})
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "rb.pt")
    t = load_teacher(str(tmp_path / "rb.pt"), num_classes=10, arch="wrn-10-2", normalize="none")
    got = t.state_dict()
    for rb, fc in names.items():
        assert torch.equal(got[fc], state[rb]), (rb, fc)
    assert torch.all(got["normalize.mean"] == 0) and torch.all(got["normalize.std"] == 1)

    # and the export writes exactly RobustBench's names
    from fastcollab.export import robustbench_state
    assert set(robustbench_state(t)) == set(names)


def test_robustbench_resnet18_and_preact_layouts(tmp_path):
    m = _perturbed("resnet18")
    rb = {("linear." + k[3:]) if k.startswith("fc.") else k: v for k, v in m.state_dict().items()
          if not k.startswith("normalize.")}
    rb["mu"] = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)  # RobustBench's normalising buffers
    rb["sigma"] = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.save(rb, tmp_path / "r18.pt")
    t = load_teacher(str(tmp_path / "r18.pt"), num_classes=10, arch="resnet18")
    m.normalize.mean.copy_(rb["mu"])
    m.normalize.std.copy_(rb["sigma"])
    with torch.no_grad():
        assert torch.equal(t(X), m(X))

    p = _perturbed("preact-resnet18")
    rb = {k.replace("fc.", "linear.").replace("shortcut.weight", "shortcut.0.weight"): v
          for k, v in p.state_dict().items() if not k.startswith("normalize.")}
    torch.save(rb, tmp_path / "pa.pt")
    t = load_teacher(str(tmp_path / "pa.pt"), num_classes=10, arch="preact-resnet18", normalize="none")
    with torch.no_grad():
        assert torch.equal(t(X), p(X))
    # RobustBench's PreActResNet without bn_before_fc is another network: refused, naming the missing BN
    torch.save({k: v for k, v in rb.items() if not k.startswith("bn.")}, tmp_path / "nobn.pt")
    with pytest.raises(FastcollabError) as e:
        load_teacher(str(tmp_path / "nobn.pt"), num_classes=10, arch="preact-resnet18", normalize="none")
    assert "missing" in _one_line(e) and "bn.weight" in _one_line(e)


def test_robustbench_zoo_layout(tmp_path, monkeypatch):
    with pytest.raises(FastcollabError) as e:
        load_teacher("robustbench:Zhang2019Theoretically", num_classes=10, models_root=tmp_path)
    msg = _one_line(e)
    assert str(tmp_path / "cifar10" / "Linf" / "Zhang2019Theoretically.pt") in msg and "never downloads" in msg

    m = _perturbed("wrn-10-2")
    from fastcollab.export import export_model
    export_model(m, "robustbench", tmp_path / "zoo" / "cifar10" / "Linf" / "Mine.pt")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "zoo"))
    t = load_teacher("robustbench:Mine", num_classes=10, arch="wrn-10-2", normalize="none")
    with torch.no_grad():
        assert torch.equal(t(X), m(X))


# ------------------------------------------------------------------------------------------ bad files

def test_bad_checkpoints_are_one_clear_line(tmp_path):
    small = _perturbed("smallcnn")
    torch.save(small.state_dict(), tmp_path / "small.pt")
    with pytest.raises(FastcollabError) as e:  # another architecture: which keys differ
        load_teacher(str(tmp_path / "small.pt"), num_classes=10, arch="resnet18")
    msg = _one_line(e)
    assert "does not fit resnet18" in msg and "missing: conv1.weight" in msg and "unexpected: features.0.0.weight" in msg
    with pytest.raises(FastcollabError) as e:  # class count
        load_teacher(str(tmp_path / "small.pt"), num_classes=100, arch="smallcnn")
    assert "predicts 10 classes" in _one_line(e) and "has 100" in _one_line(e)
    torch.save({"state_dict": small.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pt")
    with pytest.raises(FastcollabError) as e:  # weights_only refuses arbitrary objects
        load_teacher(str(tmp_path / "pickled.pt"), num_classes=10, arch="smallcnn")
    assert "weights_only=True" in _one_line(e) and "refuses" in _one_line(e)
    with pytest.raises(FastcollabError) as e:
        load_teacher(str(tmp_path / "small.pt"), num_classes=10)
    assert "--teacher-model" in _one_line(e)
    with pytest.raises(FastcollabError) as e:
        load_teacher(str(tmp_path / "absent.pt"), num_classes=10, arch="smallcnn")
    assert "no such file" in _one_line(e)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FastcollabError) as e:
        load_teacher(str(tmp_path / "junk.pt"), num_classes=10, arch="smallcnn")
    assert "cannot be read" in _one_line(e)
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "nostate.pt")
    with pytest.raises(FastcollabError) as e:
        read_state_dict(tmp_path / "nostate.pt")
    assert "holds no state dict" in _one_line(e) and "epoch" in _one_line(e)
    from fastcollab.export import export_model
    export_model(small, "torchscript", tmp_path / "ts.pt")
    with pytest.raises(FastcollabError) as e:
        load_teacher(str(tmp_path / "ts.pt"), num_classes=10, arch="smallcnn")
    assert "TorchScript" in _one_line(e)


def test_normalisation_must_be_known_and_consistent(tmp_path):
    m = _perturbed("smallcnn")
    bare = {k: v for k, v in m.state_dict().items() if not k.startswith("normalize.")}
    torch.save(bare, tmp_path / "bare.pt")
    with pytest.raises(FastcollabError) as e:
        load_teacher(str(tmp_path / "bare.pt"), num_classes=10, arch="smallcnn")
    assert "--teacher-normalize" in _one_line(e) and "none" in _one_line(e)
    t = load_teacher(str(tmp_path / "bare.pt"), num_classes=10, arch="smallcnn", normalize="cifar10")
    assert torch.allclose(t.normalize.std.flatten(), torch.tensor([0.2471, 0.2435, 0.2616]))
    m.normalize.mean.fill_(0.5)
    torch.save(m.state_dict(), tmp_path / "withbuf.pt")
    with pytest.raises(FastcollabError) as e:
        load_teacher(str(tmp_path / "withbuf.pt"), num_classes=10, arch="smallcnn", normalize="none")
    assert "carries its own input normalisation" in _one_line(e)
    assert parse_normalize("0.5,0.25") == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(FastcollabError):
        parse_normalize("0.5,0")


def test_partial_load_only_when_asked(tmp_path, capsys):
    m = _perturbed("smallcnn")
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("fc.")}
    fresh = create_model("smallcnn")
    with pytest.raises(FastcollabError) as e:
        load_weights(fresh, tmp_path / "x.pt", state=sd)
    assert "2 missing: fc.weight, fc.bias" in _one_line(e) and "--allow-partial-load" in _one_line(e)
    load_weights(fresh, tmp_path / "x.pt", allow_partial=True, state=sd)
    assert "partial load" in capsys.readouterr().out
    assert torch.equal(fresh.features[0][0].weight, m.features[0][0].weight)


# ------------------------------------------------------------------------------------------ --init

def test_warm_start_all_or_named_peers(tmp_path):
    src = _perturbed("smallcnn")
    torch.save({"model": src.state_dict()}, tmp_path / "w.pt")
    models = {"p0": create_model("smallcnn"), "p1": create_model("smallcnn")}
    spec = warm_start(models, f"p1={tmp_path / 'w.pt'}")
    assert spec == f"p1={(tmp_path / 'w.pt').resolve()}"
    assert torch.equal(models["p1"].fc.weight, src.fc.weight) and not torch.equal(models["p0"].fc.weight, src.fc.weight)
    warm_start(models, str(tmp_path / "w.pt"))
    assert torch.equal(models["p0"].fc.weight, src.fc.weight)
    with pytest.raises(FastcollabError) as e:
        warm_start(models, f"p7={tmp_path / 'w.pt'}")
    assert "no peer p7" in _one_line(e) and "p0=PATH,p1=PATH" in _one_line(e)


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def tiny_npz(mini_npz, tmp_path_factory):
    """128 training and 32 test images of cifar10_mini."""
    import numpy as np

    d = np.load(mini_npz)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=d["x_train"][:128], y_train=d["y_train"][:128], x_test=d["x_test"][:32],
             y_test=d["y_test"][:32])
    return path


def test_module_prefixed_teacher_file_trains_rslad(tiny_npz, tmp_path):
    """The issue's must-show, fast: a plain state dict with module. prefixes, given by path, teaches rslad
    (the teacher's weights need not be good here; the README's hand run uses a trained one)."""
    teacher = _perturbed("smallcnn")
    path = tmp_path / "teacher.pt"
    torch.save({f"module.{k}": v for k, v in teacher.state_dict().items()}, path)
    out = tmp_path / "rslad"
    train_cli("--method", "rslad", "--model", "smallcnn", "--dataset", f"npz:{tiny_npz}", "--teacher", str(path),
              "--teacher-model", "smallcnn", "--epochs", "1", "--batch-size", "64", "--attack-steps", "2",
              "--eval-subset", "16", "--final-eval-size", "16", "--final-attacks", "clean,pgd2", "--device", "cpu",
              "--out", str(out))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["teacher"] == str(path.resolve()) and config["teacher_model"] == "smallcnn"
    assert (out / "final.json").is_file()
    # the teacher the run used computes exactly the original's logits
    t = load_teacher(config["teacher"], num_classes=10, arch="smallcnn")
    with torch.no_grad():
        assert torch.equal(t(X), teacher(X))


def test_cli_errors_for_weights_flags(tiny_npz, tmp_path, capsys):
    common = ["--model", "smallcnn", "--dataset", f"npz:{tiny_npz}", "--epochs", "1", "--no-progress",
              "--device", "cpu", "--eval-subset", "8", "--final-eval-size", "8"]
    assert train_main(["--method", "nat", *common, "--teacher-model", "smallcnn", "--out", str(tmp_path / "a")]) == 2
    assert "--teacher-model does not apply" in capsys.readouterr().err
    assert train_main(["--method", "rslad", *common, "--teacher", "robustbench:Nope", "--model-dir",
                       str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert str(tmp_path / "cifar10" / "Linf" / "Nope.pt") in capsys.readouterr().err
    assert train_main(["--method", "nat", *common, "--init", f"p3={tmp_path}/x.pt", "--out", str(tmp_path / "c")]) == 2
    assert "no peer p3" in capsys.readouterr().err


def test_init_through_the_cli_starts_from_the_file(tiny_npz, tmp_path):
    src = _perturbed("smallcnn", seed=5)
    torch.save({"net": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "init.pt")
    out = tmp_path / "run"
    # a learning rate of 1e-9: after one epoch the weights are still the file's (a fresh init differs by O(1))
    train_cli("--method", "nat", "--model", "smallcnn", "--dataset", f"npz:{tiny_npz}", "--epochs", "1",
              "--lr", "1e-9", "--batch-size", "64", "--eval-subset", "8", "--final-eval-size", "8",
              "--final-attacks", "clean", "--device", "cpu", "--init", str(tmp_path / "init.pt"), "--out", str(out))
    assert yaml.safe_load((out / "config.yaml").read_text())["init"] == str((tmp_path / "init.pt").resolve())
    (peer,) = load_cohort(out)
    for name in ("features.0.0.weight", "fc.weight", "fc.bias"):
        assert torch.allclose(peer.state_dict()[name], src.state_dict()[name], atol=1e-6), name
