"""Numerics of a step: fp32, bf16 autocast (no scaler), or fp16 autocast with a GradScaler (CUDA only)."""
from __future__ import annotations

import contextlib
import functools

import torch

from ..errors import FastcollabError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, device: torch.device, amp: bool = False, amp_dtype: str = "bf16"):
        if amp_dtype not in AMP_DTYPES:
            raise FastcollabError(f"unknown --amp-dtype {amp_dtype!r}: use bf16 or fp16")
        if amp and amp_dtype == "fp16" and device.type != "cuda":
            raise FastcollabError("--amp-dtype fp16 needs a CUDA device (it uses a GradScaler): "
                                  "use --amp-dtype bf16 on the CPU")
        self.device, self.amp, self.amp_dtype = device, amp, amp_dtype
        self.scaler = torch.amp.GradScaler("cuda") if amp and amp_dtype == "fp16" else None

    @property
    def autocast(self):
        """A zero-argument context-manager factory (what attacks and the engine wrap forwards in)."""
        if not self.amp:
            return contextlib.nullcontext
        return functools.partial(torch.autocast, device_type=self.device.type, dtype=AMP_DTYPES[self.amp_dtype])

    def backward_and_step(self, loss: torch.Tensor, optimizers) -> None:
        if self.scaler is None:
            loss.backward()
            for opt in optimizers:
                opt.step()
            return
        self.scaler.scale(loss).backward()
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()

    def describe(self) -> str:
        return f"{self.amp_dtype} autocast" if self.amp else "fp32"
