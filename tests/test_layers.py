"""The layers import one way: sslab (the command line) -> pipelines -> orchestrator -> trainers.

trainers/ runs in a plain process (no Ray, no MLflow) and knows nothing above it; orchestrator/ never
imports pipelines/ or the command line. Every import statement counts, also those inside functions.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "trainers": {"ray", "mlflow", "orchestrator", "pipelines", "sslab"},
    "orchestrator": {"pipelines", "sslab"},
    "pipelines": {"sslab"},
}


def imported_packages(path: Path) -> dict[str, int]:
    """Top-level package of every absolute import in ``path`` -> first line that imports it."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def violations(layer: str, root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted((root / layer).rglob("*.py")):
        for package, line in imported_packages(path).items():
            if package in FORBIDDEN[layer]:
                out.append(f"{path.relative_to(root)}:{line} imports {package}")
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_upwards(layer):
    assert (ROOT / layer).is_dir()
    assert violations(layer) == []


def test_the_check_sees_imports_at_any_depth(tmp_path):
    (tmp_path / "trainers").mkdir()
    (tmp_path / "trainers" / "ok.py").write_text("import torch\nfrom trainers.errors import ConfigError\n")
    (tmp_path / "trainers" / "bad.py").write_text(
        "def f():\n    import ray.train\n    from mlflow import MlflowClient\n    from . import ok\n")
    (tmp_path / "orchestrator").mkdir()
    (tmp_path / "orchestrator" / "bad.py").write_text("if True:\n    from pipelines.spec import check_name\n")
    assert violations("trainers", tmp_path) == ["trainers/bad.py:2 imports ray", "trainers/bad.py:3 imports mlflow"]
    assert violations("orchestrator", tmp_path) == ["orchestrator/bad.py:2 imports pipelines"]
