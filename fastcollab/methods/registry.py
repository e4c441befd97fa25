"""The registry of training methods: ``--method NAME`` looks a class up here."""
from __future__ import annotations

from ..errors import FastcollabError

_METHODS: dict[str, type] = {}


def register_method(cls):
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    try:
        return _METHODS[name]
    except KeyError:
        raise FastcollabError(
            f"unknown method {name!r}: choose one of {', '.join(sorted(_METHODS))}") from None


def list_methods() -> list[str]:
    return sorted(_METHODS)
