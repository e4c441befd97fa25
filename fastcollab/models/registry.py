"""Model registry: names -> factories, and ``create_model`` that adds the in-model normalisation.

Every model built here takes NCHW float images in [0, 1] and returns logits ``[N, num_classes]``; the
per-channel normalisation ``(x - mean) / std`` (when asked for) is the model's first layer, kept as buffers,
so attacks and evaluators never need to know about it (the torchattacks / AutoAttack / RobustBench contract).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch
from torch import nn

from fastcollab.errors import FastcollabError

_REGISTRY: dict[str, Callable[[int], nn.Module]] = {}

# Names built by a parser rather than a fixed entry: (regex, human-readable pattern, builder(match, classes)).
_PATTERNS: list[tuple[re.Pattern[str], str, Callable[[re.Match[str], int], nn.Module]]] = []


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean and std as buffers (saved in the state dict).

    Built with mean 0 and std 1 it is an exact identity, so every model carries one and a checkpoint always
    restores the statistics it was trained with.
    """

    def __init__(self, mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(tuple(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(tuple(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}"


def register_model(name: str):
    """Decorator: register ``factory(num_classes) -> nn.Module`` (a class or a function) under ``name``.

    The module must own a ``normalize`` submodule (a :class:`Normalize`) and apply it first in ``forward``.
    """
    key = name.strip().lower()

    def deco(factory):
        old = _REGISTRY.get(key)
        same = old is not None and (
            getattr(old, "__module__", None), getattr(old, "__qualname__", None)
        ) == (getattr(factory, "__module__", None), getattr(factory, "__qualname__", None))
        if old is not None and not same:
            raise FastcollabError(
                f"model name {key!r} is already registered by {old!r}; register the new model under another name"
            )
        _REGISTRY[key] = factory
        return factory

    return deco


def register_model_pattern(regex: str, pattern: str):
    """Decorator: register ``builder(match, num_classes)`` for every name matching ``regex`` (full match)."""

    def deco(builder):
        _PATTERNS.append((re.compile(regex), pattern, builder))
        return builder

    return deco


def list_models() -> list[str]:
    """The registered model names, sorted (the parsed families, e.g. ``wrn-{depth}-{width}``, are not listed)."""
    return sorted(_REGISTRY)


def _available() -> str:
    return ", ".join(list_models() + [p for _, p, _ in _PATTERNS])


def _floats(v) -> tuple[float, ...]:
    if isinstance(v, (int, float)):
        return (float(v),)
    return tuple(float(e) for e in torch.as_tensor(v, dtype=torch.float64).flatten().tolist())


def _check_normalize(normalize) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if normalize is None:
        return None
    hint = "pass normalize=None or normalize=((m_r, m_g, m_b), (s_r, s_g, s_b)) with std > 0"
    try:
        mean, std = normalize
        mean, std = _floats(mean), _floats(std)
    except (TypeError, ValueError, RuntimeError):
        raise FastcollabError(
            f"normalize={normalize!r} is not a (mean, std) pair of per-channel numbers; {hint}"
        ) from None
    mean = mean * 3 if len(mean) == 1 else mean
    std = std * 3 if len(std) == 1 else std
    if len(mean) != 3 or len(std) != 3:
        raise FastcollabError(f"normalize has {len(mean)} means and {len(std)} stds but models take 3 channels; {hint}")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise FastcollabError(f"normalize std must be finite and > 0 (got mean={mean}, std={std}); {hint}")
    return mean, std


def create_model(name: str, num_classes: int = 10, normalize=None, image_size: int = 32) -> nn.Module:
    """Build a registered model.

    ``normalize``: None, or ``(mean, std)`` per-channel tuples on the [0, 1] scale; applied inside the model.
    ``image_size``: the side of the (square) input images. Every model is a CIFAR (32x32) design; for 64x64
    inputs (Tiny-ImageNet) its stem, the first convolution, gets stride 2, so every later feature map, the
    compute per image and the receptive fields are those of the 32x32 model (the weights' shapes do not
    change). Other sizes run the 32x32 model as is (global average pooling accepts any size >= 32).
    The result has ``model.arch`` (the canonical name), ``model.num_classes``, ``model.normalization``
    (None or the (mean, std) tuples) and ``model.image_size``, enough to rebuild it from a checkpoint's config.
    Raises FastcollabError for an unknown name or a bad argument.
    """
    if not isinstance(name, str):
        raise FastcollabError(f"model name must be a string, got {name!r}; use one of: {_available()}")
    key = name.strip().lower()
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise FastcollabError(
            f"num_classes must be an integer >= 2, got {num_classes!r}; pass the dataset's class count"
        )
    norm = _check_normalize(normalize)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise FastcollabError(f"image_size must be a positive integer, got {image_size!r}; pass the images' side")
    if key in _REGISTRY:
        model = _REGISTRY[key](num_classes)
    else:
        for regex, _, builder in _PATTERNS:
            m = regex.fullmatch(key)
            if m:
                model = builder(m, num_classes)
                break
        else:
            raise FastcollabError(f"unknown model {name!r}; use one of: {_available()}")
    if not isinstance(getattr(model, "normalize", None), Normalize):
        raise FastcollabError(
            f"model {key!r} has no Normalize submodule named 'normalize'; add one and apply it first in forward()"
        )
    if norm is not None:
        model.normalize = Normalize(*norm)
    if image_size == 64:
        _stem(model).stride = (2, 2)
    model.arch = key
    model.image_size = image_size
    model.num_classes = num_classes
    model.normalization = norm
    return model


def _stem(model: nn.Module) -> nn.Conv2d:
    """The model's first convolution (every family registers its stem before any other layer)."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions, unit/zero BatchNorm, default-uniform linear layers."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
