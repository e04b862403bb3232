"""Every `>>>` example in the library's docstrings runs (those marked `+SKIP` need a real
run, a cluster or storage, and are shown only)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import orchestrator
import rcig


def _modules() -> list[str]:
    names = []
    for pkg in (rcig, orchestrator):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
