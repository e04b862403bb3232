"""rcig: RCIG dataset distillation in JAX, resumable on preemptible machines.

Public API (importable from `rcig` itself; each name lives in the module shown):

    make_config, DistillConfig, ConfigError      rcig.config      a run's settings
    run_distillation, RunResult                  rcig.distill     a whole run, resumable
    Engine                                       rcig.engine      the jitted, sharded step
    evaluate_source, evaluate_distilled          rcig.evaluate    train-from-scratch evaluation
    load_distilled, Distilled                    rcig.distilled_io  a saved distilled set
    read_metrics                                 rcig.run_folder  a run folder's metric rows
    load_dataset, DatasetError                   rcig.data        datasets and their splits

`import rcig` imports none of them until one is used (no JAX, Ray or gcsfs at import).

The modules are of two kinds, and the split is checked (tests/test_layout.py):

Pure (math and data structures; no files, network, signals, clocks of the machine or
process state; they import only each other and numerical libraries):
    config, krr, step, model, engine, lr_search, augment, export, units
    (`engine` places arrays on devices; `export` builds the distilled set's arrays and
    its PNG bytes in memory.)

I/O (storage, files, signals, HTTP, processes), built on the pure ones:
    storage (local and gs:// objects), run_folder (a run folder's files),
    checkpoint (Orbax), preemption (signals, the GCE metadata server),
    lease, multihost, distill (a run), distilled_io, evaluate (datasets and the
    evaluation's partial file), val_probe, cost (the preflight), data (datasets).
A new module is pure if it fits the first list's rule, and then goes into `PURE` below.
"""

from __future__ import annotations

import importlib

PURE = ("config", "krr", "step", "model", "engine", "lr_search", "augment", "export", "units")

_WHERE = {
    "make_config": "config", "DistillConfig": "config", "ConfigError": "config",
    "run_distillation": "distill", "RunResult": "distill",
    "Engine": "engine",
    "evaluate_source": "evaluate", "evaluate_distilled": "evaluate",
    "load_distilled": "distilled_io", "Distilled": "distilled_io",
    "read_metrics": "run_folder",
    "load_dataset": "data", "DatasetError": "data",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"rcig.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'rcig' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
