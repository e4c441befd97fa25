"""The CUDA-graphed engine: the eager engine's whole cohort step, captured once and replayed.

After ``warmup_steps`` ordinary eager steps on a side stream (real training steps: they let cuDNN pick its
algorithms and create the optimizers' momentum buffers), one step is captured into a ``torch.cuda.CUDAGraph``:
every peer's attack loop (the attacks of different peers on their own streams, forked from and joined back
to the capturing stream with stream waits), the views, the method's loss, the backward and every optimizer
step. Every later step copies the batch into static input buffers and replays the graph: one launch for the
whole step, no host round trip.

What makes a step capturable:
- the batch lives in static buffers (``x`` stays NCHW so random starts draw the same numbers as eager);
- the learning rate lives in a device tensor per parameter group, refreshed from the group's float (which
  ``Cohort.set_epoch_time`` writes) before each replay, and the SGD update is written here with ``torch._foreach``
  ops that read it (``torch.optim.SGD`` would read a tensor lr with ``.item()``, a host sync);
- random starts use torch's Philox CUDA generator, which is capture-safe (each replay advances its offset);
- bf16 autocast (when asked, ``--amp``) with its weight-cast cache off inside the graph; no GradScaler;
- models in channels_last, ``cudnn.benchmark`` on.
Host-side inputs of the loss (``StepContext``: the epoch) key the graph: a new epoch value is captured anew.

Where capture is impossible the engine says why in one line (``fallback_reason``) and runs eager steps:
fp16 with a GradScaler (its inf check skips steps on the host), optimizers other than SGD, a failed capture.
"""
from __future__ import annotations

import functools
import logging
import warnings

import torch

from ..cohort import Cohort
from ..methods import LossResult, StepContext
from .eager import EagerEngine
from .precision import AMP_DTYPES, Precision

log = logging.getLogger("fastcollab")


class _GraphPrecision(Precision):
    """The run's precision with autocast's weight-cast cache off (cached casts must not outlive a capture)."""

    def __init__(self, base: Precision):
        super().__init__(base.device, base.amp, base.amp_dtype)
        self.scaler = base.scaler

    @property
    def autocast(self):
        if not self.amp:
            return super().autocast
        return functools.partial(torch.autocast, device_type=self.device.type, dtype=AMP_DTYPES[self.amp_dtype],
                                 cache_enabled=False)


class GraphedEngine(EagerEngine):
    name = "fast"

    def __init__(self, cohort: Cohort, precision: Precision, view_bn: str = "eval", *, warmup_steps: int = 3,
                 streams: bool = True, channels_last: bool = True):
        super().__init__(cohort, _GraphPrecision(precision), view_bn)
        self.warmup_steps = max(1, int(warmup_steps))
        self.fallback_reason = self._why_not()
        self.steps_done = self.replays = self.captures = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._key = self._out = self._static = self._tensors = None
        self._capturing = False
        if self.fallback_reason is not None:
            self.name = "eager (graphed engine fell back)"
            msg = f"fastcollab: graphed engine falls back to eager: {self.fallback_reason}"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return
        torch.backends.cudnn.benchmark = True
        if channels_last:
            for m in cohort.models.values():
                m.to(memory_format=torch.channels_last)       # in place: same Parameter objects
        # one stream per attacked peer (attacks on one peer stay in order on its stream)
        peers = list(dict.fromkeys(a.peer for a in self.plan.attacks))
        self._stream_of = {p: torch.cuda.Stream(device=precision.device) for p in peers} if streams else {}
        self._lr = {n: [torch.tensor(float(g["lr"]), device=precision.device, dtype=torch.float32)
                        for g in opt.param_groups] for n, opt in cohort.optimizers.items()}
        self._pool = torch.cuda.graph_pool_handle()

    # ----------------------------------------------------------------------------------- capturability
    def _why_not(self) -> str | None:
        p = self.precision
        if p.device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if p.scaler is not None:
            return "fp16 autocast uses a GradScaler, whose inf check skips steps on the host: use --amp-dtype bf16"
        for name, opt in self.cohort.optimizers.items():
            if type(opt) is not torch.optim.SGD:
                return f"peer {name}'s optimizer {type(opt).__name__} has no graph-safe step here (SGD only)"
            for g in opt.param_groups:
                if g.get("maximize") or g.get("differentiable"):
                    return f"peer {name}'s SGD uses maximize/differentiable, which the captured step does not do"
        if getattr(self.cohort.method, "host_decisions", False):
            return f"method {self.cohort.method.name} takes a host-side decision inside its step"
        return None

    def describe(self) -> str:
        if self.fallback_reason:
            return f"eager (graphed engine fell back: {self.fallback_reason})"
        return (f"graphed (CUDA graph, {len(self._stream_of)} attack streams, {self.precision.describe()}, "
                f"{self.captures} captures, {self.replays} replays)")

    # ------------------------------------------------------------------------------------------- hooks
    def _attacks(self, x, y, clean):
        if not self._capturing or len(self._stream_of) < 2:
            return super()._attacks(x, y, clean)
        main = torch.cuda.current_stream()
        out = {}
        for s in self._stream_of.values():
            s.wait_stream(main)                                   # fork
        for a in self.plan.attacks:
            with torch.cuda.stream(self._stream_of[a.peer]):
                out[a.key] = self._attack(a, x, y, clean)
        for s in self._stream_of.values():
            main.wait_stream(s)                                   # join
        return out

    # ----------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def _sgd_step(self) -> None:
        """``torch.optim.SGD.step`` (weight decay, momentum, dampening, Nesterov) with lr read from a tensor."""
        for name, opt in self.cohort.optimizers.items():
            for group, lr in zip(opt.param_groups, self._lr[name]):
                params = [p for p in group["params"] if p.grad is not None]
                if not params:
                    continue
                grads = [p.grad for p in params]
                if group["weight_decay"] != 0:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                if group["momentum"] != 0:
                    bufs = [opt.state[p]["momentum_buffer"] for p in params]
                    torch._foreach_mul_(bufs, group["momentum"])
                    torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
                    grads = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
                torch._foreach_sub_(params, torch._foreach_mul(grads, lr))

    def _body(self, x, y, ctx) -> LossResult:
        cohort = self.cohort
        cohort.train_mode()
        result = cohort.method.loss(self.compute_table(x, y), y, ctx)
        result.total.backward()
        self._sgd_step()
        return result

    def _tensor_ids(self) -> tuple:
        """Addresses the graph baked in: parameters and momentum buffers (replaced by load_state_dict)."""
        ids = []
        for opt in self.cohort.optimizers.values():
            for g in opt.param_groups:
                for p in g["params"]:
                    buf = opt.state.get(p, {}).get("momentum_buffer")
                    ids.append((p.data_ptr(), None if buf is None else buf.data_ptr()))
        return tuple(ids)

    def _eager_step(self, x, y, ctx) -> LossResult:
        side, main = torch.cuda.Stream(device=x.device), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            result = super().step(x, y, ctx)
        main.wait_stream(side)
        return result

    def _capture(self, x, y, ctx, key) -> None:
        for opt in self.cohort.optimizers.values():
            for g in opt.param_groups:
                if g["momentum"] != 0 and any(p.requires_grad and "momentum_buffer" not in opt.state.get(p, {})
                                              for p in g["params"]):
                    raise RuntimeError("a parameter has no momentum buffer after the warm-up steps")
        self.graph = self._out = None
        self._static = (x.clone(), y.clone())
        for opt in self.cohort.optimizers.values():
            opt.zero_grad(set_to_none=True)       # gradients are allocated inside the graph, overwritten by replays
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        self._capturing = True
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                self._out = self._body(*self._static, ctx)
        finally:
            self._capturing = False
        self.graph, self._key, self._tensors = graph, key, self._tensor_ids()
        self.captures += 1

    def step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> LossResult:
        if self.fallback_reason is not None:
            return super().step(x, y, ctx)
        if self.steps_done < self.warmup_steps:
            self.steps_done += 1
            return self._eager_step(x, y, ctx)
        key = (ctx.epoch, ctx.epochs, tuple(x.shape), tuple(y.shape), x.dtype, y.dtype)
        if self.graph is None or key != self._key or self._tensor_ids() != self._tensors:
            try:
                self._capture(x, y, ctx, key)
            except Exception as e:  # noqa: BLE001 - whatever breaks capture, eager still computes the step
                self.graph = None
                self.fallback_reason = f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
                self.name = "eager (graphed engine fell back)"
                log.warning("fastcollab: graphed engine falls back to eager: %s", self.fallback_reason)
                warnings.warn(f"fastcollab: graphed engine falls back to eager: {self.fallback_reason}",
                              RuntimeWarning, stacklevel=2)
                for opt in self.cohort.optimizers.values():
                    opt.zero_grad(set_to_none=True)
                return super().step(x, y, ctx)
        sx, sy = self._static
        sx.copy_(x)
        sy.copy_(y)
        for name, opt in self.cohort.optimizers.items():
            for group, lr in zip(opt.param_groups, self._lr[name]):
                lr.fill_(float(group["lr"]))
        self.graph.replay()
        self.replays += 1
        self.steps_done += 1
        out = self._out   # the graph's output buffers: copied, the next replay overwrites them
        own = lambda v: v.detach().clone() if torch.is_tensor(v) else v  # noqa: E731
        return LossResult(own(out.total), {k: own(v) for k, v in out.terms.items()},
                          {k: own(v) for k, v in out.correct.items()})
