"""Where things live: the project checkout, the state directory and the data root."""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "SSLAB_HOME"
DATA_ROOT_ENV = "SSLAB_DATA_ROOT"


def project_root() -> Path | None:
    """The source checkout this package runs from (editable install), or None when installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def state_dir() -> Path:
    """Cached .beton files, MLflow store, run outputs. ``$SSLAB_HOME``, else ``<checkout>/.state``,
    else ``~/.local/share/sslab``. Always absolute (Ray jobs run in another working directory)."""
    env = os.environ.get(STATE_ENV)
    if env:
        path = Path(env).expanduser()
    elif project_root() is not None:
        path = project_root() / ".state"
    else:
        path = Path.home() / ".local" / "share" / "sslab"
    return path.resolve()


def default_data_root() -> Path | None:
    """``$SSLAB_DATA_ROOT``, else ``../shared/data`` beside the working directory or the checkout
    when that exists, else None (data sets then look only in their own default places)."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    bases = [Path.cwd()]
    if project_root() is not None:
        bases.append(project_root())
    for base in bases:
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate.resolve()
    return None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write to a temporary name beside ``path``, then rename: a reader (or a crash) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
