"""The layout rule of `rcig/__init__.py`: pure modules import no I/O module.

Read from the source (ast), every import at any depth (a function-level import counts):
a pure module imports only other pure modules of rcig and no library that reaches
files, the network, signals or processes, and calls no `open`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rcig

RCIG = Path(rcig.__file__).resolve().parent
# Libraries whose use is I/O (files, network, signals, processes, storage, clusters).
IO_LIBS = {"os", "sys", "pathlib", "shutil", "tempfile", "glob", "socket", "signal", "subprocess",
           "threading", "multiprocessing", "urllib", "http", "requests", "fsspec", "gcsfs", "ray", "orbax",
           "etils", "logging", "select", "fcntl", "pickle", "zipfile", "uuid"}


def _imports(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            if node.module == "rcig":  # `from rcig import krr`: the module is the name
                out.update(f"rcig.{a.name}" for a in node.names)
    return out


def _module_path(name: str) -> Path:
    return RCIG / f"{name}.py"


@pytest.mark.parametrize("name", rcig.PURE)
def test_pure_module_imports_no_io(name):
    tree = ast.parse(_module_path(name).read_text())
    bad = []
    for mod in sorted(_imports(tree)):
        top = mod.split(".")[0]
        if top == "rcig" and mod != "rcig":
            if mod.split(".")[1] not in rcig.PURE:
                bad.append(mod)
        elif top in IO_LIBS:
            bad.append(mod)
    calls_open = [n.lineno for n in ast.walk(tree)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "open"]
    assert not bad and not calls_open, (f"rcig/{name}.py is listed pure (rcig/__init__.py) but imports "
                                        f"{', '.join(bad) or 'nothing I/O'}; calls open() at lines {calls_open}")


def test_every_module_is_classified():
    """Each module of rcig/ is named in the docstring of rcig/__init__.py, pure or I/O."""
    doc = rcig.__doc__ or ""
    names = sorted(p.stem for p in RCIG.glob("*.py") if p.stem != "__init__") + ["data"]
    missing = [n for n in names if f" {n}" not in doc and f"{n}," not in doc]
    assert not missing, f"rcig/__init__.py does not say whether these are pure or I/O: {missing}"


def test_public_api_resolves():
    for name in rcig.__all__:
        assert getattr(rcig, name) is not None
