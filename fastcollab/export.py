"""``python -m fastcollab.export``: write one trained peer in a layout other tools load.

    python -m fastcollab.export --run runs/trades [--peer p0] --format safetensors --out trades.safetensors

Formats (every one takes NCHW images in [0, 1]: the normalisation is inside, and the weights are those of
eval mode, BN running statistics included):

- ``safetensors``: fastcollab's state dict (``normalize.mean`` / ``normalize.std`` included) with the
  architecture, class count and image size as metadata; ``--teacher FILE`` reads it back with no other flag.
- ``robustbench``: ``torch.save({"state_dict": ...})`` with the key names of RobustBench's architectures:
  ``wrn-*`` -> ``WideResNet(depth, widen_factor=k)``, ``resnet18`` -> ``ResNet18()``, ``preact-resnet18`` ->
  ``PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)``. A non-identity normalisation is written as
  the ``mu`` / ``sigma`` buffers RobustBench's normalising wrappers use (e.g. its ``Rice2020OverfittingNet``);
  the bare architectures take no such keys. Other architectures have no RobustBench counterpart.
- ``torchscript``: ``torch.jit.trace`` of the model in eval mode (for tools that load a whole model; loading
  it runs its code, so fastcollab itself never loads this format).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_write
from .errors import FastcollabError
from .rundir import load_run_models
from .teachers import pick_peer

FORMATS = ("safetensors", "robustbench", "torchscript")
METADATA_FORMAT = "fastcollab-weights-1"


def robustbench_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under RobustBench's key names (see the module docstring)."""
    arch = getattr(model, "arch", "")
    if arch.startswith("wrn-"):
        rules = ((r"^(block\d+)\.(\d+)\.", r"\1.layer.\2."), (r"\.shortcut\.", ".convShortcut."), (r"^bn\.", "bn1."))
    elif arch == "resnet18":
        rules = ((r"^fc\.", "linear."),)
    elif arch == "preact-resnet18":
        rules = ((r"^fc\.", "linear."), (r"\.shortcut\.weight$", ".shortcut.0.weight"))
    else:
        raise FastcollabError(f"--format robustbench: RobustBench has no counterpart of {arch or 'this model'} "
                              "(it has WideResNet, ResNet-18 and PreAct ResNet-18): use --format safetensors or "
                              "torchscript")
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("normalize."):
            continue
        for rx, rep in rules:
            key = re.sub(rx, rep, key)
        out[key] = value.detach().cpu().clone()
    mean, std = model.normalize.mean, model.normalize.std
    if not (torch.all(mean == 0) and torch.all(std == 1)):
        out["mu"], out["sigma"] = mean.detach().cpu().clone(), std.detach().cpu().clone()
    return out


def export_model(model: nn.Module, fmt: str, out: str | Path, source: str = "") -> Path:
    """Write ``model`` (a fastcollab model) to ``out`` in format ``fmt``; returns the path."""
    if fmt not in FORMATS:
        raise FastcollabError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    model = model.eval().cpu()
    if fmt == "safetensors":
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        meta = {"format": METADATA_FORMAT, "arch": str(model.arch), "num_classes": str(model.num_classes),
                "image_size": str(getattr(model, "image_size", 32)), "source": source}
        blob = save(state, metadata=meta)
        atomic_write(out, lambda f: f.write(blob))
    elif fmt == "robustbench":
        state = robustbench_state(model)
        atomic_write(out, lambda f: torch.save({"state_dict": state}, f))
    else:
        size = int(getattr(model, "image_size", 32))
        with torch.no_grad():
            traced = torch.jit.trace(model, torch.rand(1, 3, size, size), check_trace=False)
        atomic_write(out, lambda f: torch.jit.save(traced, f))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastcollab.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (the --out of python -m fastcollab.train)")
    p.add_argument("--peer", help="peer name (p0) or index (0); default: the first trainable peer")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="file to write")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = Path(args.run)
        if not run.is_dir():
            raise FastcollabError(f"--run {run}: no such directory: pass the --out directory of a training run")
        config, models = load_run_models(run, "cpu")
        name = pick_peer(models, args.peer, str(run), f"--peer {args.peer}")
        path = export_model(models[name], args.format, args.out, source=f"{run.resolve()}:{name}")
    except FastcollabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {run}:{name} ({models[name].arch}, {config['num_classes']} classes) as {args.format}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
