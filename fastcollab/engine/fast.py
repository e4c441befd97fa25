"""The CPU fast path: the eager engine's step, with the same math, executed faster on a CPU.

What it changes (each measured against the eager engine in the same process, bench/RESULTS.md "Throughput"):

- **Folded attack twins.** An attack with eval-mode BatchNorm (the default of every method here) and the
  no-grad eval views run on a *twin* of each model: an ``torch.fx`` copy in which every ``conv → BatchNorm``
  pair is one convolution with a bias (``w' = w·γ/√(σ²+ε)``, ``b' = β − μ·γ/√(σ²+ε)``, exactly what
  eval-mode BatchNorm applies, up to float rounding). The twin's other tensors *alias* the live model's
  parameters and buffers (no copy; the optimizer's in-place updates are seen at once); the folded weights
  are recomputed before each use whenever a tensor they derive from changed (the optimizer step, or a
  train-mode forward that moved the BN statistics: a Madry-style attack on the same model). The twin never
  requires parameter gradients, so attack backwards compute input gradients only. In the twin,
  ``max_pool(relu(z))`` becomes ``relu(max_pool(z))`` (identical values and gradients: ReLU is monotone,
  and both orders send the gradient to the same element) and an identity input normalisation is dropped.
- **channels_last** weights (the live models are converted once, in place; the optimizers keep their
  parameters): oneDNN convolutions and max-pooling run on NHWC without layout reorders.
- **The fused C++ ops** (``fastcollab._C``): the ops' default CPU backend; ``ops_backend=`` forces one.

Attacks whose BatchNorm runs in train mode (Madry-style, ARD, ...) use the live model, exactly as eager:
they update the running statistics. Random initialisation draws stay in NCHW order, so for a fixed seed
the fast and eager engines draw the same numbers and, in fp32, produce the same losses up to float rounding.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..cohort import Cohort
from ..models.registry import Normalize
from .eager import EagerEngine
from .precision import Precision

_RELUS_F = (F.relu, torch.relu)
_POOLS_F = (F.max_pool2d, torch.max_pool2d)


@contextlib.contextmanager
def ops_backend(name: str | None):
    """Run the block with the fused ops' backend forced to ``name`` and restore the previous choice after;
    ``None`` leaves the current choice (``set_backend`` / ``FASTCOLLAB_BACKEND`` / the device default)."""
    if name is None:
        yield
        return
    prev = ops._override
    ops.set_backend(name)
    try:
        yield
    finally:
        ops._override = prev


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


def _is_identity_normalize(m: nn.Module) -> bool:
    return isinstance(m, Normalize) and bool((m.mean == 0).all()) and bool((m.std == 1).all())


class FoldedTwin(nn.Module):
    """An eval-only, gradient-free copy of ``model`` for attack loops and no-grad eval views.

    ``refresh()`` recomputes the folded convolutions from the live model's current weights and running
    statistics (call it once per step, before the attacks); everything else aliases the live tensors.
    """

    def __init__(self, model: nn.Module, swap_relu_pool: bool = True, fold_bn: bool = True):
        super().__init__()
        self.live = [model]            # a list, so the live model is not registered as a submodule
        twin = copy.deepcopy(model)
        self._aliases: list[tuple[str, torch.Tensor]] = []
        live_p = dict(model.named_parameters(remove_duplicate=False))
        live_b = dict(model.named_buffers(remove_duplicate=False))
        for mod_name, mod in twin.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            for pn, p in list(mod._parameters.items()):
                if p is not None:
                    src = live_p[prefix + pn]
                    mod._parameters[pn] = nn.Parameter(src.detach(), requires_grad=False)
                    self._aliases.append((prefix + pn, mod._parameters[pn]))
            for bn_, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[bn_] = live_b[prefix + bn_]
        graph = _Tracer().trace(twin)
        gm = fx.GraphModule(twin, graph)
        self.folds: list[tuple[nn.Conv2d, nn.Conv2d, nn.BatchNorm2d]] = []
        self.swaps = 0
        self.normalize_dropped = False
        mods = dict(gm.named_modules())
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            mod = mods[node.target]
            if fold_bn and isinstance(mod, nn.BatchNorm2d) and self._foldable(node, mod, mods):
                conv_node = node.args[0]
                conv = mods[conv_node.target]
                fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                                  device=conv.weight.device, dtype=conv.weight.dtype)
                fused.weight = nn.Parameter(torch.empty_like(conv.weight), requires_grad=False)
                fused.bias = nn.Parameter(torch.empty_like(fused.bias), requires_grad=False)
                name = f"folded_{len(self.folds)}"
                gm.add_submodule(name, fused)
                conv_node.target = name
                node.replace_all_uses_with(conv_node)
                gm.graph.erase_node(node)
                self.folds.append((fused, conv, mod))
            elif isinstance(mod, Normalize) and _is_identity_normalize(mod):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                self.normalize_dropped = True
        if swap_relu_pool:
            for node in list(gm.graph.nodes):
                if self._is_pool(node, mods):
                    src = node.args[0]
                    if isinstance(src, fx.Node) and self._is_relu(src, mods) and len(src.users) == 1:
                        # pool(relu(z)) -> relu(pool(z)): the relu node now reads the pool's output
                        node.args = (src.args[0],) + tuple(node.args[1:])
                        node.replace_all_uses_with(src)
                        src.args = (node,) + tuple(src.args[1:])
                        src.kwargs = {k: v for k, v in src.kwargs.items() if k != "input"}
                        node.append(src)
                        self.swaps += 1
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        self.gm = gm.eval()
        self.refresh()

    @staticmethod
    def _foldable(node: fx.Node, bn: nn.BatchNorm2d, mods) -> bool:
        src = node.args[0] if node.args else None
        return (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), nn.Conv2d)
                and len(src.users) == 1 and len(node.args) == 1 and not node.kwargs
                and bn.track_running_stats and bn.running_mean is not None
                and mods[src.target].padding_mode == "zeros")

    @staticmethod
    def _is_pool(node: fx.Node, mods) -> bool:
        if node.op == "call_module":
            m = mods.get(node.target)
            return isinstance(m, nn.MaxPool2d) and not m.return_indices
        return node.op == "call_function" and node.target in _POOLS_F and not node.kwargs.get("return_indices")

    @staticmethod
    def _is_relu(node: fx.Node, mods) -> bool:
        if node.op == "call_module":
            return isinstance(mods.get(node.target), nn.ReLU)
        return node.op == "call_function" and node.target in _RELUS_F and not node.kwargs

    def aliases_current(self) -> bool:
        """False once the live model's tensors were replaced (``.to()``, ``load_state_dict(assign=True)``)."""
        live = dict(self.live[0].named_parameters(remove_duplicate=False))
        return all(name in live and live[name].data_ptr() == t.data_ptr() for name, t in self._aliases)

    def _versions(self) -> tuple:
        # a train-mode BN forward updates running_mean/var inside the kernel without bumping their version
        # counters; it always bumps num_batches_tracked (``+= 1`` in Python), so that one is read as well
        return tuple(t._version for _, conv, bn in self.folds
                     for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                               bn.num_batches_tracked)
                     if t is not None)

    def sync(self) -> None:
        """Refresh the folded weights if any tensor they come from changed since the last refresh (an optimizer
        step, or a train-mode forward of the live model, such as a Madry-style attack, that moved its BN
        statistics): tensors' version counters tell, at no cost."""
        if self._versions() != self._seen:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Fold BatchNorm into the preceding convolution with the live model's current tensors."""
        for fused, conv, bn in self.folds:
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            shift = -bn.running_mean * scale
            if conv.bias is not None:
                shift = shift + conv.bias * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            fused.bias.copy_(shift)
        self._seen = self._versions()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)

    def train(self, mode: bool = True):  # always eval: attacks toggle BN modes on the modules they get
        super().train(False)
        return self


class FastEngine(EagerEngine):
    """The eager step with folded eval twins, channels_last and the fused C++ ops (CPU; see module doc).

    Options exist to measure each change alone (bench/throughput.py ``--ablate``)."""

    name = "fast"

    def __init__(self, cohort: Cohort, precision: Precision, view_bn: str = "eval", *, fold_bn: bool = True,
                 channels_last: bool = True, swap_relu_pool: bool = True, twins: bool = True,
                 ops_backend: str | None = None):
        super().__init__(cohort, precision, view_bn)
        self.fold_bn, self.swap_relu_pool, self.use_twins = fold_bn, swap_relu_pool, twins
        self.channels_last, self.ops_backend = channels_last, ops_backend
        self.notes: list[str] = []
        if channels_last:
            for m in cohort.models.values():
                m.to(memory_format=torch.channels_last)   # in place: same Parameter objects
        self.twins: dict[str, FoldedTwin] = {}
        if twins:
            for name in self._eval_models():
                self._build_twin(name)

    def _eval_models(self) -> list[str]:
        """Models that some step evaluates with eval-mode BatchNorm: attacked (eval BN), guides, no-grad views."""
        names = [a.peer for a in self.plan.attacks if a.spec.bn_mode == "eval"]
        names += [a.guide for a in self.plan.attacks if a.guide is not None]
        names += list(self.plan.clean_refs) + list(self.plan.nograd_batched)
        return [n for n in dict.fromkeys(names) if n in self.cohort.models]

    def _build_twin(self, name: str) -> None:
        try:
            self.twins[name] = FoldedTwin(self.cohort.models[name], self.swap_relu_pool, self.fold_bn)
        except Exception as e:  # noqa: BLE001 - a model torch.fx cannot trace: run it as eager does
            self.twins.pop(name, None)
            self.notes.append(f"{name}: no folded twin ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                              "its attacks use the live model")

    def describe(self) -> str:
        folds = sum(len(t.folds) for t in self.twins.values())
        return (f"fast (cpu): {len(self.twins)} folded twins ({folds} conv+BN folds), "
                f"channels_last={self.channels_last}, ops={self.ops_backend or 'default'}"
                + (f"; {'; '.join(self.notes)}" if self.notes else ""))

    # -------------------------------------------------------------------------------------- hooks
    def _refresh(self) -> None:
        for name, twin in list(self.twins.items()):
            if not twin.aliases_current():
                self._build_twin(name)

    def _twin(self, name: str | None, mode: str) -> FoldedTwin | None:
        """The folded twin of ``name`` for an eval-mode use, its weights current (None: use the live model)."""
        twin = self.twins.get(name) if name is not None and mode == "eval" else None
        if twin is not None:
            twin.sync()
        return twin

    def _attack_model(self, name, mode):
        twin = self._twin(name, mode)
        return twin if twin is not None else super()._attack_model(name, mode)

    def _nograd(self, name, inputs, mode):
        twin = self._twin(name, mode)
        if twin is None:
            return super()._nograd(name, inputs, mode)
        with torch.no_grad(), self.precision.autocast():
            out = twin(torch.cat(inputs) if len(inputs) > 1 else inputs[0]).float()
        return list(out.split([t.shape[0] for t in inputs]))

    def compute_table(self, x, y):
        with ops_backend(self.ops_backend):
            self._refresh()
            return super().compute_table(x, y)

    def step(self, x, y, ctx):
        with ops_backend(self.ops_backend):
            return super().step(x, y, ctx)
