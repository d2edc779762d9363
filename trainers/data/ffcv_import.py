"""Import ffcv without paying four seconds of numba compilation in every process.

ffcv 1.0.2 builds one numba typed dictionary at import time (``ffcv/fields/rgb_image.py``:
``IMAGE_MODES = Dict(); IMAGE_MODES['jpg'] = 0; ...``). Filling it compiles numba's dictionary
methods, which takes 3.8 s on this project's 2-core CI machine (``python -X importtime``; numba's
on-disk cache does not cover typed containers), and every process that imports ffcv pays it: each
Ray Train worker at every (re)start, each Tune trial, each ``sslab`` command that reads a ``.beton``.
The dictionary is only ever read from Python (``generate_code`` copies the two numbers into locals
before compiling; the writer stores one into a numpy record), never inside jitted code, so a plain
``dict`` with the same entries behaves the same. ``import_ffcv`` hands ffcv's import a plain ``dict``
for ``numba.typed.Dict`` and puts numba's back afterwards. Only for the pinned ffcv 1.0.2, whose
source was read for this; any other version is imported as it is.
"""

from __future__ import annotations

import importlib
import sys
import threading
from importlib import metadata

CHECKED_VERSION = "1.0.2"
_lock = threading.Lock()


def import_ffcv():
    """The ``ffcv`` module (ImportError when it is not installed), imported at most once per process."""
    if "ffcv" in sys.modules:
        return sys.modules["ffcv"]
    with _lock:
        if "ffcv" in sys.modules:
            return sys.modules["ffcv"]
        try:
            version = metadata.version("ffcv")
        except metadata.PackageNotFoundError:
            version = None
        if version != CHECKED_VERSION:
            return importlib.import_module("ffcv")
        import numba.typed

        had = "Dict" in vars(numba.typed)  # numba.typed resolves Dict lazily (module __getattr__)
        saved = vars(numba.typed).get("Dict")
        numba.typed.Dict = dict
        try:
            return importlib.import_module("ffcv")
        finally:
            if had:
                numba.typed.Dict = saved
            else:
                del numba.typed.Dict
