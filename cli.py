"""`rcig`: the command-line entry point. Only assembles the Typer app.

Each command is a thin shell over one library function (in `rcig/` or `orchestrator/`)
whose docstring is its help. Sections below are owned by different parts of the project.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="rcig",
    help="RCIG dataset distillation: local runs, Ray Tune sweeps, leaderboards, fetch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# ---- section: distill ---------------------------------------------------------------
# ---- end section: distill -----------------------------------------------------------

# ---- section: eval ------------------------------------------------------------------
# ---- end section: eval --------------------------------------------------------------

# ---- section: sweep / best / fetch --------------------------------------------------
# ---- end section: sweep / best / fetch ----------------------------------------------

# ---- section: report ----------------------------------------------------------------
# ---- end section: report ------------------------------------------------------------

# ---- section: cluster ---------------------------------------------------------------
# ---- end section: cluster -----------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    app()
