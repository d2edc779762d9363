"""Value checks shared by every layer: configs, sweep and pipeline files, command-line options.

Every key of a config, sweep or pipeline file is type-checked with these before anything runs, so that a
typo fails in one line (a ``ConfigError`` naming the key and an example) instead of as a traceback later.
"""

from __future__ import annotations

import math
import re

from trainers.errors import ConfigError

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
SEED_LIMIT = 2**31  # seeds are combined as seed * 1000 + rank: keep them well inside 64 bits


def check_name(value, what: str, example: str = "demo") -> str:
    """A name that becomes a folder (and an MLflow run name): letters, digits, '.', '_', '-'."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ConfigError(f"{what} {value!r} is not a plain name: use letters, digits, '.', '_' and '-', not "
                          f"starting with '.' (it names an output folder), e.g. {example}")
    return value


def check_number(value, what: str, *, integer: bool = False, minimum=None, above=None, maximum=None, below=None,
                 example=None):
    """``value`` if it is an int (``integer``) or a finite int/float within the bounds; booleans are refused."""
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(value)
    if ok:
        ok = ((minimum is None or value >= minimum) and (above is None or value > above)
              and (maximum is None or value <= maximum) and (below is None or value < below))
    if not ok:
        bounds = [text for bound, text in ((minimum, f">= {minimum}"), (above, f"> {above}"),
                                           (maximum, f"<= {maximum}"), (below, f"< {below}")) if bound is not None]
        need = ("an integer" if integer else "a finite number") + (" " + " and ".join(bounds) if bounds else "")
        hint = f", e.g. {example}" if example is not None else ""
        raise ConfigError(f"{what} is {value!r}: give {need}{hint}")
    return value


def check_gpus(value, what: str):
    """A GPU share for Ray: a fraction in [0, 1] or a whole number of GPUs."""
    check_number(value, what, minimum=0, example="0.25 or 1")
    if value > 1 and value != int(value):
        raise ConfigError(f"{what} is {value!r}: give a fraction in [0, 1] or a whole number of GPUs")
    return value


def check_bool(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} is {value!r}: give true or false")
    return value


def check_text(value, what: str, example: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what} is {value!r}: give a non-empty string, e.g. {example}")
    return value


def as_list(value, what: str, example: str, allow_single=(str,)) -> list:
    """A YAML list; a single string (or number, where ``allow_single`` says so) is a one-item list.
    Never iterated character by character."""
    if isinstance(value, allow_single) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(f"{what} is {value!r}: give a list, e.g. {example}")
    return list(value)


def overrides_list(value, what: str) -> list[str]:
    """A ``set:`` entry: section.key=value strings (one string is a list of one)."""
    items = as_list([] if value is None else value, what, "[train.epochs=4, optim.lr=0.5]")
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{what}: {item!r} is not a section.key=value string: quote entries like "
                              f"\"knn.k=[20]\" and write key=value, not key: value")
    return items
