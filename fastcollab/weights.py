"""External weights: one loader for every checkpoint fastcollab did not write itself (``--teacher PATH``,
``--teacher robustbench:NAME``, ``--init PATH``).

    read_state_dict(path, what) -> (state dict, metadata)
    parse_normalize(text, what) -> None | (mean, std)
    load_weights(model, path, what, allow_partial=False) -> {"normalization": ...}
    model_from_file(path, arch, num_classes, image_size=32, normalize=..., what=..., allow_partial=False)

Files are read with ``torch.load(weights_only=True)`` or safetensors only, so a checkpoint never runs code.
Layouts understood: a bare state dict; one nested under ``state_dict``, ``model_state_dict``, ``model`` or
``net``; keys prefixed by ``module.`` (DataParallel), ``_orig_mod.`` (torch.compile) or ``model.`` (a
wrapper), stripped when every key carries them.

Key names of other code bases are mapped onto fastcollab's models when a key does not exist in the model and
its mapped name does (so a fastcollab key is never renamed):

- WideResNet of the TRADES code, used by RobustBench (``WideResNet``): ``blockG.layer.I.`` -> ``blockG.I.``,
  ``convShortcut`` -> ``shortcut``, final ``bn1`` -> ``bn``; the unused ``sub_block1`` of that code (defined,
  never called in ``forward``) is dropped. Its blocks compute exactly fastcollab's (the projection shortcut
  reads the pre-activated input).
- ResNet-18 (RobustBench ``ResNet18``): ``linear`` -> ``fc``.
- PreAct ResNet-18 (RobustBench ``PreActResNet(PreActBlockV2, bn_before_fc=True)``): ``linear`` -> ``fc``,
  ``shortcut.0`` -> ``shortcut``. RobustBench's ``PreActResNet(PreActBlock)`` without ``bn_before_fc``
  (Wong2020Fast, Andriushchenko2020Understanding) is another network (no final BN, shortcut from the raw
  input): its files lack ``bn.*`` and are refused as missing keys.
- Normalisation buffers ``mu`` / ``sigma`` (RobustBench) or ``mean`` / ``std`` -> ``normalize.mean`` /
  ``normalize.std``.

A missing ``num_batches_tracked`` (older PyTorch) keeps the model's own counter; it is not used in eval mode.
"""
from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import FastcollabError

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "_orig_mod.", "model.")
NORM_KEYS = ("normalize.mean", "normalize.std")

# (pattern, replacement) applied in order to a key that the model does not have
_RENAMES = (
    (re.compile(r"^(block\d+)\.layer\.(\d+)\."), r"\1.\2."),
    (re.compile(r"\.convShortcut\."), ".shortcut."),
    (re.compile(r"\.shortcut\.0\.weight$"), ".shortcut.weight"),
    (re.compile(r"^bn1\."), "bn."),
    (re.compile(r"^linear\."), "fc."),
    (re.compile(r"^(mu|mean)$"), "normalize.mean"),
    (re.compile(r"^(sigma|std)$"), "normalize.std"),
)
_UNUSED_PREFIXES = ("sub_block1.",)  # TRADES / RobustBench WideResNet: defined, never used in forward()

NAMED_NORMALIZATIONS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NORMALIZE_HELP = ("none (the model takes [0, 1] inputs, e.g. the TRADES / RobustBench WideResNets), cifar10, "
                  "cifar100, or MEAN,STD (2 numbers, or 3 means and 3 stds)")


def _names(keys, limit: int = 6) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist())
    except (zipfile.BadZipFile, OSError, IndexError):
        return False


def read_state_dict(path: str | Path, what: str = "--teacher") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a checkpoint file in any common layout, and the file's metadata (safetensors only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FastcollabError(f"{what} {path}: no such file: pass an existing .pt/.pth/.safetensors checkpoint")
    metadata: dict = {}
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            payload = load_file(str(path))
        except Exception as e:  # noqa: BLE001 -- any failure is the same user-facing problem
            raise FastcollabError(f"{what} {path} is not a readable safetensors file ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:160]}): re-export it") from None
    else:
        if _is_torchscript(path):
            raise FastcollabError(f"{what} {path} is a TorchScript archive (it holds code, which fastcollab "
                                  "never runs): pass its weights instead, e.g. python -m fastcollab.export "
                                  "--format safetensors")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if refused is None:
                raise FastcollabError(f"{what} {path} cannot be read as a PyTorch checkpoint (not a pickle "
                                      "torch.load understands): it is corrupt or not a checkpoint") from None
            raise FastcollabError(
                f"{what} {path} is a pickled checkpoint that torch.load(weights_only=True) refuses (it holds a "
                f"{refused.group(1)} object, not only tensors): fastcollab never unpickles code; in a Python session "
                "you trust, re-save only its tensors, e.g. torch.save(torch.load(PATH, weights_only=False)"
                "['state_dict'], 'weights.pt')") from None
        except Exception as e:  # noqa: BLE001 -- truncated or foreign files raise many types
            raise FastcollabError(f"{what} {path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:160]}): it is corrupt or not a checkpoint") from None
    return _unwrap(payload, path, what), metadata


def _unwrap(payload, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(payload, dict) and payload.get("format") == "fastcollab-checkpoint-1":
        raise FastcollabError(f"{what} {path} is a fastcollab run checkpoint: pass its run directory "
                              f"({path.parent}) for --teacher, or export a peer first: python -m fastcollab.export "
                              f"--run {path.parent} --format safetensors --out PEER.safetensors")
    while isinstance(payload, dict) and not all(torch.is_tensor(v) for v in payload.values()):
        inner = next((k for k in WRAPPER_KEYS if isinstance(payload.get(k), dict)), None)
        if inner is None:
            other = [str(k) for k, v in payload.items() if not torch.is_tensor(v)]
            raise FastcollabError(f"{what} {path} holds no state dict: its entries {_names(other)} are not tensors "
                                  f"and none of {', '.join(WRAPPER_KEYS)} holds one: save model.state_dict()")
        payload = payload[inner]
    if not isinstance(payload, dict) or not payload:
        raise FastcollabError(f"{what} {path} holds {type(payload).__name__}, not a state dict of tensors: save "
                              "model.state_dict()")
    state = {str(k): v for k, v in payload.items()}
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
                changed = True
    return state


def map_keys(state: dict[str, torch.Tensor], target: set[str]) -> dict[str, torch.Tensor]:
    """Rename foreign keys onto ``target`` (the model's keys); see the module docstring."""
    out = {}
    for key, value in state.items():
        if key not in target and key.startswith(_UNUSED_PREFIXES) and not any(
                t.startswith(_UNUSED_PREFIXES) for t in target):
            continue
        new = key
        if key not in target:
            for rx, rep in _RENAMES:
                new = rx.sub(rep, new)
            if new not in target:
                new = key
        if new in NORM_KEYS and value.numel() in (1, 3):
            value = value.reshape(-1).expand(3).reshape(1, 3, 1, 1)
        out[new] = value
    return out


def parse_normalize(text, what: str = "--teacher-normalize"):
    """``none`` -> None, a dataset name -> its (mean, std), ``MEAN,STD`` or 6 numbers -> (mean, std)."""
    t = str(text).strip().lower()
    if t == "none":
        return None
    if t in NAMED_NORMALIZATIONS:
        return NAMED_NORMALIZATIONS[t]
    try:
        v = [float(x) for x in t.split(",")]
    except ValueError:
        v = []
    if len(v) not in (2, 6) or not all(math.isfinite(x) for x in v) or min(v[len(v) // 2:]) <= 0:
        raise FastcollabError(f"{what} {text!r} is not understood: pass {NORMALIZE_HELP}, std > 0")
    if len(v) == 2:
        return (v[0],) * 3, (v[1],) * 3
    return tuple(v[:3]), tuple(v[3:])


def load_weights(model: nn.Module, path: str | Path, what: str = "--teacher", allow_partial: bool = False,
                 state: dict | None = None) -> dict:
    """Load the file's tensors into ``model`` (strict unless ``allow_partial``). Returns ``{"normalization":
    (mean, std) or None}``: the file's own normalisation buffers, when it has them (then loaded too)."""
    if state is None:
        state, _ = read_state_dict(path, what)
    own = model.state_dict()
    mapped = map_keys(state, set(own))
    arch = getattr(model, "arch", type(model).__name__)
    fc = mapped.get("fc.weight")
    classes = getattr(model, "num_classes", None)
    if fc is not None and fc.dim() == 2 and classes is not None and fc.shape[0] != classes:
        raise FastcollabError(f"{what} {path}: the checkpoint predicts {fc.shape[0]} classes (fc.weight is "
                              f"{list(fc.shape)}) but this dataset has {classes}: use a checkpoint trained on "
                              "this dataset")
    has_norm = all(k in mapped for k in NORM_KEYS)
    optional = set(NORM_KEYS) | {k for k in own if k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in mapped and k not in optional]
    unexpected = [k for k in mapped if k not in own]
    mismatched = [f"{k} (file {list(mapped[k].shape)}, model {list(own[k].shape)})"
                  for k in mapped if k in own and mapped[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = "; ".join(p for p in (
            f"{len(missing)} missing: {_names(missing)}" if missing else "",
            f"{len(unexpected)} unexpected: {_names(unexpected)}" if unexpected else "",
            f"{len(mismatched)} of another shape: {_names(mismatched, 3)}" if mismatched else "") if p)
        if not allow_partial:
            raise FastcollabError(f"{what} {path} does not fit {arch} ({problems}): it is another architecture; "
                                  f"pass the right model name, or --allow-partial-load to load only the tensors "
                                  "that fit")
        print(f"warning: {what} {path}: partial load into {arch} ({problems})")
    fitting = {k: v for k, v in mapped.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict({**own, **fitting})
    norm = None
    if has_norm:
        norm = (tuple(mapped["normalize.mean"].flatten().tolist()), tuple(mapped["normalize.std"].flatten().tolist()))
    return {"normalization": norm}


def model_from_file(path: str | Path, arch: str | None, num_classes: int, image_size: int = 32,
                    normalize: str | None = None, what: str = "--teacher", allow_partial: bool = False,
                    arch_flag: str = "--teacher-model", normalize_flag: str = "--teacher-normalize") -> nn.Module:
    """A model of architecture ``arch`` (or the one a fastcollab safetensors export records) with the file's
    weights. The input normalisation comes from the file's buffers; without them ``normalize`` must say it
    (``parse_normalize``); with them, a ``normalize`` that disagrees is an error."""
    from .models import create_model

    state, metadata = read_state_dict(path, what)
    arch = arch or metadata.get("arch")
    if not arch:
        raise FastcollabError(f"{what} {path}: name its architecture with {arch_flag} NAME (e.g. wrn-34-10 for "
                              "the TRADES / RobustBench WRN-34-10, wrn-28-10, resnet18, preact-resnet18)")
    model = create_model(arch, num_classes=num_classes, image_size=image_size)
    info = load_weights(model, path, what, allow_partial, state=state)
    given = parse_normalize(normalize, normalize_flag) if normalize is not None else None
    file_norm = info["normalization"]
    if file_norm is not None:
        if normalize is not None:
            want = given if given is not None else ((0.0,) * 3, (1.0,) * 3)
            if not all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(sum(file_norm, ()), sum(want, ()))):
                raise FastcollabError(f"{what} {path} carries its own input normalisation (mean {file_norm[0]}, "
                                      f"std {file_norm[1]}) but {normalize_flag} {normalize} says otherwise: drop "
                                      f"{normalize_flag} (the file's buffers are used)")
    elif normalize is None:
        raise FastcollabError(f"{what} {path} holds no input normalisation buffers: say what its inputs are with "
                              f"{normalize_flag} {NORMALIZE_HELP}")
    elif given is not None:
        model.normalize.mean.copy_(torch.tensor(given[0]).view(1, 3, 1, 1))
        model.normalize.std.copy_(torch.tensor(given[1]).view(1, 3, 1, 1))
    model.normalization = (tuple(model.normalize.mean.flatten().tolist()),
                           tuple(model.normalize.std.flatten().tolist()))
    return model


def warm_start(models: dict[str, nn.Module], spec: str, allow_partial: bool = False) -> str:
    """``--init``: load ``PATH`` into every trainable peer, or ``p0=PATH,p1=PATH`` into the peers named (the
    others start from scratch). The file's normalisation buffers, when present, replace the peer's. Returns
    the spec with absolute paths (saved in config.yaml)."""
    text = str(spec).strip()
    if "=" in text:
        pairs = [part.partition("=") for part in text.split(",") if part.strip()]
        wanted = {name.strip(): path.strip() for name, _, path in pairs}
        bad = [n for n in wanted if n not in models]
        if bad or not all(wanted.values()):
            raise FastcollabError(f"--init {spec}: {'no peer ' + ', '.join(bad) if bad else 'a peer without a path'}; "
                                  f"write --init PATH (every peer) or --init {','.join(f'{n}=PATH' for n in models)}")
    else:
        wanted = {n: text for n in models}
    absolute = {n: str(Path(p).expanduser().resolve()) for n, p in wanted.items()}
    for name, path in absolute.items():
        load_weights(models[name], path, f"--init ({name})", allow_partial)
    if "=" not in text:
        return next(iter(absolute.values()))
    return ",".join(f"{n}={p}" for n, p in absolute.items())
