"""Self-supervised methods: each module owns its heads, EMA teacher, queue and schedules.

The training loop only sees the ``Method`` interface (``trainers/methods/base.py``).
"""

from __future__ import annotations

import difflib
import importlib

from trainers.errors import ConfigError

# name -> (module, class). simclr is SupCon without labels.
_REGISTRY = {
    "swav": ("trainers.methods.swav", "SwAV"),
    "dino": ("trainers.methods.dino", "DINO"),
    "sdmp": ("trainers.methods.sdmp", "SDMP"),
    "supcon": ("trainers.methods.supcon", "SupCon"),
    "simclr": ("trainers.methods.supcon", "SimCLR"),
}
METHODS = tuple(_REGISTRY)


def check_method(name: str) -> str:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown method '{name}': {hint}use one of {', '.join(METHODS)}")
    return name


def method_class(name: str):
    module, cls = _REGISTRY[check_method(name)]
    return getattr(importlib.import_module(module), cls)


def method_config_class(name: str):
    return method_class(name).config_class
