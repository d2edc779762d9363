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
    "supcon": ("trainers.methods.supcon", "SupCon"),
    "simclr": ("trainers.methods.supcon", "SimCLR"),
}
# names whose class (and options) depend on one option: name -> (option, default, {value: (module, class)})
_VARIANTS = {
    "sdmp": ("base", "moco_v3", {"moco_v3": ("trainers.methods.sdmp", "SDMPMoCo"),
                                 "dino": ("trainers.methods.sdmp", "SDMPDINO")}),
}
METHODS = ("swav", "dino", "sdmp", "supcon", "simclr")


def check_method(name: str) -> str:
    if name not in _REGISTRY and name not in _VARIANTS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown method '{name}': {hint}use one of {', '.join(METHODS)}")
    return name


def method_class(name: str, options=None):
    """The Method class of ``name``; for SDMP the one of its ``base`` (read from ``options``: the method
    section as a dict, or its dataclass; none: the default base)."""
    if check_method(name) in _VARIANTS:
        option, default, classes = _VARIANTS[name]
        value = options.get(option, default) if isinstance(options, dict) else getattr(options, option, default)
        if not isinstance(value, str) or value not in classes:
            raise ConfigError(f"method.{option} '{value}' must be one of {', '.join(classes)}")
        module, cls = classes[value]
    else:
        module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def method_config_class(name: str, options=None):
    return method_class(name, options).config_class
