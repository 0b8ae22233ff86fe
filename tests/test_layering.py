"""Imports inside the package point down the layers, never up (README, Layout).

Layers, bottom to top:

1. ``files``, ``labels``, ``compat``, ``_backend``, ``heads``, ``registry``, ``rundir``,
   ``data/``, ``models/``
2. ``inference/`` and ``training/`` (training may import inference, not the reverse), and
   ``config`` (the run configuration validates its options against the training registries)
3. ``evaluation/``, ``viz/`` (viz reads arrays and paths: it does not import ``data/``) and
   ``slides/`` (whole-slide prediction: on inference, beside evaluation)
4. ``cli``; the scripts sit on top of everything

Every ``import`` in every module is checked, those inside functions included (a function-level
import is still a dependency, only a later one). The package's ``__init__`` is its public face
and may import anything; nothing inside the package below evaluation may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xsight_keras"
BOTTOM = ("files", "labels", "compat", "_backend", "heads", "registry", "rundir", "data", "models")
GROUPS = (*BOTTOM, "config", "inference", "training", "evaluation", "viz", "slides", "cli")
ABOVE_BOTTOM = {"config", "inference", "training", "evaluation", "viz", "slides", "cli",
                "xsight_keras"}

#: source group → groups it must not import ("xsight_keras": the package's __init__)
FORBIDDEN = {
    **{group: ABOVE_BOTTOM for group in BOTTOM},
    "inference": {"config", "training", "evaluation", "viz", "slides", "cli", "xsight_keras"},
    "training": {"evaluation", "viz", "slides", "cli", "xsight_keras"},
    "config": {"inference", "evaluation", "viz", "slides", "cli", "xsight_keras"},
    "evaluation": {"slides", "cli"},
    "viz": {"cli", "data", "slides"},
    "slides": {"config", "training", "evaluation", "viz", "cli", "xsight_keras"},
}

#: Arrows that other changes remove; each entry says which, and comes off once it is merged.
PENDING: dict = {}


def _group(module: str) -> str | None:
    """``xsight_keras.training.run`` → ``training``; the package itself → ``xsight_keras``."""
    parts = module.split(".")
    if parts[0] != "xsight_keras":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in GROUPS else "xsight_keras"


def _module_name(path: Path) -> str:
    parts = ["xsight_keras", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(code: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in ``code``, at any depth, where
    ``code`` is the module ``name`` (a package's ``__init__`` when ``is_package``)."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(code, name)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from xsight_keras import viz` imports the submodule: count each name as one
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _edges() -> list[tuple[str, str, str, int, str]]:
    """(source group, target group, file, line, imported module) for every in-package import."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _group(_module_name(path))
        for line, module in _imports(path.read_text(), _module_name(path), path.name == "__init__.py"):
            target = _group(module)
            if target is not None and target != source:
                edges.append((source, target, str(path.relative_to(PACKAGE.parent)), line, module))
    return edges


EDGES = _edges()


def _rule_params():
    for source, targets in FORBIDDEN.items():
        for target in sorted(targets):
            marks = ()
            if (source, target) in PENDING:
                marks = pytest.mark.xfail(strict=False, reason=PENDING[(source, target)])
            yield pytest.param(source, target, id=f"{source}->{target}", marks=marks)


@pytest.mark.parametrize(("source", "target"), list(_rule_params()))
def test_no_import_up_the_layers(source, target):
    bad = [f"{file}:{line} imports {module}" for s, t, file, line, module in EDGES
           if s == source and t == target]
    assert not bad, f"{source} must not import {target}:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    unplaced = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                if _group(_module_name(p)) == "xsight_keras" and p != PACKAGE / "__init__.py"]
    assert not unplaced, f"add these to a layer in tests/test_layering.py (and README): {unplaced}"


def test_function_level_and_relative_imports_are_seen():
    # evaluate_run imports the confusion-matrix figure inside the function
    assert any(file.endswith("evaluation/evaluate.py") and module.startswith("xsight_keras.viz")
               for _, _, file, _, module in EDGES)
    code = "import os\ndef f():\n    from ..data import prepared\n    from . import plots\n"
    assert [m for _, m in _imports(code, "xsight_keras.viz.plots")] == [
        "os", "xsight_keras.data.prepared", "xsight_keras.viz.plots"]
    assert [m for _, m in _imports("from .plots import x", "xsight_keras.viz", True)] == [
        "xsight_keras.viz.plots.x"]
    assert _group("xsight_keras.data.prepared.x") == "data" and _group("os") is None
