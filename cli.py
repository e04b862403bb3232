"""`rcig`: the command-line entry point. Only assembles the Typer app.

Each command is a thin shell over one library function (in `rcig/` or `orchestrator/`)
whose docstring is its help.

Exit codes (every error is one line, `error: ...`; the traceback only with RCIG_DEBUG=1):

    0    done
    1    a local run, eval, report or cluster command failed, or `doctor` found problems
    2    a sweep command (launch, resume, status, best, fetch) could not start or read
         the sweep, or the sweep ended with trials in ERROR
    75   stopped on request (SIGTERM/SIGINT, a GCE notice) with its work committed:
         rerun the same command to resume
    77   the run folder's lease was taken over by another process (this one stopped writing)
    130  interrupted (Ctrl-C) where nothing is kept
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

# Options and arguments shared by several commands.
SweepArg = Annotated[str, typer.Argument(help="Sweep name (under the default root, $RCIG_SWEEP_ROOT or ./sweep_results) or its URI.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]

app = typer.Typer(
    name="rcig",
    help="RCIG dataset distillation: local runs, Ray Tune sweeps, leaderboards, fetch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# ---- logging: one line per record; library tracebacks only with RCIG_DEBUG=1 ----------
def _setup_logging() -> None:
    """Library log records (gcsfs, aiohttp, asyncio, Orbax...) print one line each, with the
    exception's type and message instead of its traceback, and an uncaught error in a
    background thread prints one line; all unless RCIG_DEBUG=1."""
    import logging
    import sys
    import threading

    if os.environ.get("RCIG_DEBUG"):
        return

    def squash(text: object) -> str:
        return " ".join(str(text).split())

    class OneLine(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            exc = record.exc_info[1] if record.exc_info else None
            record = logging.makeLogRecord(record.__dict__)
            record.exc_info = record.exc_text = record.stack_info = None
            line = squash(super().format(record))
            return line + (f" ({type(exc).__name__}: {squash(exc)})" if exc is not None else "")

    one_line = OneLine("%(levelname)s:%(name)s:%(message)s")
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
        root.setLevel(logging.WARNING)
    for h in root.handlers:  # plain stderr handlers only (a test harness's are left alone)
        if type(h) is logging.StreamHandler:
            h.setFormatter(one_line)

    def thread_error(args) -> None:
        if args.exc_type is not SystemExit:
            name = getattr(args.thread, "name", "?")
            print(f"warning: thread {name}: {args.exc_type.__name__}: {squash(args.exc_value)}",
                  file=sys.stderr, flush=True)

    def unraisable(u) -> None:
        if u.exc_type is not None:
            print(f"warning: {u.exc_type.__name__}: {squash(u.exc_value)}", file=sys.stderr, flush=True)

    if threading.excepthook is threading.__excepthook__:  # not when a harness installed its own
        threading.excepthook = thread_error
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = unraisable


@app.callback()
def _main() -> None:
    """RCIG dataset distillation: local runs, Ray Tune sweeps, leaderboards, fetch."""
    _setup_logging()


# ---- section: distill ---------------------------------------------------------------
def _fail(msg: str, code: int = 1) -> None:
    """Print a user error (`error: ...`, one line per line of `msg`) and exit with `code`."""
    for line in str(msg).splitlines() or [""]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def _fail_one_line(e: BaseException, code: int = 1, *, with_type: bool = True) -> None:
    """An unexpected error as one line (`Type: message`); re-raised with RCIG_DEBUG=1."""
    if os.environ.get("RCIG_DEBUG"):
        raise e
    msg = " ".join(str(e).split())
    _fail(f"{type(e).__name__}: {msg}" if with_type else msg, code)


@app.command("distill")
def distill_cmd(
    dataset: str = typer.Option("digits", help="Dataset name: digits (bundled), mnist, fashion_mnist, cifar10, cifar100, tiny_imagenet, npz."),
    ipc: int = typer.Option(1, help="Images per class."),
    steps: int = typer.Option(None, help="Outer steps (default: the preset's)."),
    preset: str = typer.Option(None, help="Config preset (default: the dataset's; see rcig/config.py)."),
    seed: int = typer.Option(0, help="Run seed."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder or gs:// URI holding the dataset files."),
    out: str = typer.Option(None, help="Run folder (path or gs:// URI). Rerunning with the same --out resumes."),
    set_: list[str] = typer.Option([], "--set", help="Config override, dotted: --set inner.n_steps=10 (repeatable)."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the evaluation stage at the end."),
    restart: bool = typer.Option(False, "--restart", help="Start over even if --out holds checkpoints (moves them aside)."),
    force: bool = typer.Option(False, "--force", help="With --restart: delete the old checkpoints."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved preset, the step's FLOPs, memory per device and an estimated wall time; run nothing."),
):
    """Distill a dataset locally (no Ray) into --out; resumes if --out has checkpoints.

    Without an accelerator and without --preset, the dataset's laptop preset is used (one
    line says so); --preset names any other (e.g. the paper's).

    Example: rcig distill --dataset digits --ipc 1 --out runs/digits1
    """
    from rcig.config import ConfigError, make_config
    from rcig.cost import choose_preset, preflight

    try:
        top = {"seed": seed, "data_dir": data_dir}
        if steps is not None:
            top["steps"] = steps
        preset, preset_note = choose_preset(dataset, ipc, preset)
        cfg = make_config(dataset, ipc, preset=preset, overrides=list(set_), **top)
    except ConfigError as e:
        _fail(str(e))
    if preset_note:
        typer.echo(preset_note, err=True)
    from rcig.data import DatasetError

    try:
        lines = preflight(cfg, dry_run=dry_run)
    except DatasetError as e:
        _fail(str(e))
    for line in lines:
        typer.echo(line, err=not dry_run)
    if dry_run:
        return
    out = out or f"runs/{cfg.dataset}_ipc{cfg.ipc}_seed{cfg.seed}"
    from rcig.distill import EXIT_PREEMPTED, run_distillation
    from rcig.preemption import GcePreemptionWatcher, StopControl

    typer.echo(f"distilling {cfg.dataset} ipc={cfg.ipc} preset={cfg.preset} steps={cfg.steps} -> {out}", err=True)
    try:
        # A stop request (SIGTERM/SIGINT, GCE notice) is honoured in every phase: the
        # step loop checkpoints and returns; elsewhere the process exits 75 at once.
        with GcePreemptionWatcher() as gce, StopControl(sources=(gce,)) as stop:
            held = _take_run_folder(out)
            stop.add_abort_hook(lambda phase: held.release())
            try:
                res = run_distillation(cfg, out, restart=restart, force=force, run_eval=not no_eval,
                                       stop_requested=stop.requested, progress=not quiet)
            finally:
                held.release()
    except Exception as e:  # user-facing: one line, no traceback
        _fail_one_line(e)
    if res.status == "preempted":
        typer.echo(f"stopped by signal at step {res.step}; checkpoint committed at step {res.checkpoint_step}. "
                   f"Rerun the same command to resume.", err=True)
        from rcig.preemption import exit_preempted

        exit_preempted(EXIT_PREEMPTED)  # committed; a slow interpreter shutdown must not eat the notice
    if res.eval:
        ev = res.eval
        base = ev.get("baseline") or {}
        typer.echo(f"eval ({ev.get('protocol')}, {ev.get('runs', len(ev.get('accs', [])))} runs): distilled "
                   f"{ev['mean']:.4f} ± {ev['std']:.4f}" + (f" vs random {base['mean']:.4f} ± {base['std']:.4f}" if base else ""))
    typer.echo(f"done: {res.step} steps in {res.wall_s:.1f} s; files in {res.out_uri}")
    typer.echo(f"next: rcig eval {res.out_uri}   (or open {res.out_uri}/distilled.png)")


def _take_run_folder(out: str):
    """The run folder's lease (one writer at a time): waits out a holder that was killed
    (its lease goes stale within 3 heartbeats), refuses one that is alive."""
    from rcig import lease

    def lost(why: str) -> None:  # another process took the folder: stop writing at once
        typer.echo(f"error: {why}", err=True)
        os._exit(77)

    return lease.acquire(out, wait_s=lease.stale_after_s() + 1, on_lost=lost)


# ---- end section: distill -----------------------------------------------------------

# ---- section: eval ------------------------------------------------------------------
def _eval_user_errors() -> tuple[type[BaseException], ...]:
    from rcig.config import ConfigError
    from rcig.data import DatasetError
    from rcig.distilled_io import DistilledError
    from rcig.evaluate import EvalError
    from rcig.storage import StorageError

    return (EvalError, DistilledError, DatasetError, ConfigError, StorageError, FileNotFoundError)


@app.command("eval")
def eval_cmd(
    source: str = typer.Argument(..., help="distilled.npz, a run folder from `rcig distill`, or its checkpoints folder (path or gs:// URI)."),
    runs: int = typer.Option(None, "--runs", help="Networks trained per set (default: the run config's eval.runs, 5)."),
    protocol: str = typer.Option(None, "--protocol", help="rcig (one random augmentation per image per step) or noaug."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also evaluate a random real subset of the same ipc."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (mean, std, accs, baseline, protocol, dataset, ipc, ...)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder or gs:// URI holding the dataset files (default: the run config's)."),
    steps: int = typer.Option(None, "--steps", help="Training steps per network (default: the spec's 1000 if N == 10 else 2000)."),
):
    """Evaluate a distilled set: train fresh ReLU ConvNets on it (docs/algorithm.md §10) and report test
    accuracy, next to a random real subset of the same size trained the same way.

    Example: rcig eval runs/digits_ipc1_seed0 --runs 5
    prints   distilled 0.8xx ± 0.0xx vs random 0.6xx ± 0.0xx
    """
    import json as _json

    if protocol is not None and protocol not in ("rcig", "noaug"):
        _fail(f"--protocol: expected rcig or noaug, got {protocol!r}")
    if runs is not None and runs < 1:
        _fail(f"--runs: must be >= 1, got {runs}")
    if steps is not None and steps < 1:
        _fail(f"--steps: must be >= 1, got {steps}")
    from rcig.evaluate import evaluate_source

    try:
        res = evaluate_source(source, runs=runs, protocol=protocol, baseline=baseline,
                              data_dir=data_dir, steps=steps)
    except _eval_user_errors() as e:
        _fail_one_line(e, with_type=False)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # anything else: still one line (the traceback with RCIG_DEBUG=1)
        _fail_one_line(e)
    if as_json:
        typer.echo(_json.dumps(res, indent=2))
        return
    base = res.get("baseline")
    line = f"distilled {res['mean']:.4f} ± {res['std']:.4f}"
    if base:
        line += f" vs random {base['mean']:.4f} ± {base['std']:.4f}"
    typer.echo(line)
    typer.echo("  distilled runs: " + " ".join(f"{a:.4f}" for a in res["accs"]))
    if base:
        typer.echo("  random runs:    " + " ".join(f"{a:.4f}" for a in base["accs"]))
    typer.echo(f"  {res['dataset']} ipc={res['ipc']} protocol={res['protocol']} steps={res['steps']} "
               f"runs={res['runs']} flip={res['use_flip']} width={res['width']} ({res['wall_s']:.1f} s)")


# ---- end section: eval --------------------------------------------------------------

# ---- section: sweep / best / fetch --------------------------------------------------
sweep_app = typer.Typer(help="Ray Tune sweeps of RCIG: launch, resume, status, doctor.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")


def _sweep_fail(msg: str, code: int = 2) -> None:
    _fail(msg, code)


def _sweep_user_errors() -> tuple[type[BaseException], ...]:
    from orchestrator.manifest import ManifestError
    from orchestrator.results import ResultsError
    from orchestrator.spec import SpecError
    from orchestrator.sweep import SweepError
    from rcig.config import ConfigError
    from rcig.storage import StorageError

    return (SpecError, SweepError, ManifestError, ResultsError, ConfigError, StorageError,
            FileNotFoundError)


def _sweep_done(out, ref: str | None = None) -> None:
    from orchestrator.locate import default_root
    from rcig import storage as _st

    if ref is None:
        ref = out.name if out.sweep_uri == _st.join(default_root(), out.name) else out.sweep_uri
    for note in out.notes:
        typer.echo(f"note: {note}", err=True)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(out.counts.items())) or "no trials"
    typer.echo(f"sweep {out.name}: {counts} -> {out.sweep_uri}")
    typer.echo(f"next: rcig best {ref}   |   rcig sweep status {ref}   |   rcig fetch {ref} --to DIR")


@sweep_app.command("launch")
def sweep_launch_cmd(
    spec: str = typer.Argument(..., help="Sweep spec YAML, e.g. sweeps/quickstart.yaml."),
    storage: str = typer.Option(None, "--storage", help="Parent folder or URI of sweeps (default: spec's `storage`, $RCIG_SWEEP_ROOT or ./sweep_results)."),
    name: str = typer.Option(None, "--name", help="Sweep name (default: the spec's `name`)."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (default: start Ray on this machine)."),
    set_: list[str] = typer.Option([], "--set", help="Override: config field (--set steps=20) or spec key (--set max_concurrent=2); repeatable."),
    shared_storage: bool = typer.Option(False, "--shared-storage", help="With --address: the local --storage path is a mount every node shares (NFS); without it a cluster needs gs:// storage."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the base preset, a trial's step FLOPs, memory per device and estimated wall time; launch nothing."),
    mlflow: str = typer.Option(None, "--mlflow", metavar="URI", help="Also log every trial to MLflow at this tracking URI (e.g. file:///abs/mlruns or http://host:5000; needs rcig-sweep[tracking]). Default: no MLflow."),
):
    """Launch a sweep; rerunning it adopts trials that already exist (finished ones are not rerun).

    Example: rcig sweep launch sweeps/quickstart.yaml --set steps=30
    """
    from orchestrator.spec import load_spec
    from orchestrator.sweep import launch

    if dry_run:
        from rcig.cost import sweep_dry_run

        try:
            sp = load_spec(spec, sets=list(set_), storage=storage, name=name)
            n, unit = sp.accelerators_per_trial()
            lines = sweep_dry_run(sp.base.dataset, sp.base.ipc, sp.base.preset, sp.base.overrides,
                                  trials=sp.grid_size(), max_concurrent=sp.max_concurrent, accelerators=f"{n} {unit}")
        except _sweep_user_errors() as e:
            _sweep_fail(str(e))
        for line in lines:
            typer.echo(line)
        return
    try:
        # Everything knowable before launch, the trials' data included, before Ray starts.
        load_spec(spec, sets=list(set_), storage=storage, name=name, check_data=True)
        out = launch(spec, storage_uri=storage, name=name, address=address, sets=list(set_),
                     shared_storage=shared_storage, mlflow=mlflow)
    except _sweep_user_errors() as e:
        _sweep_fail(str(e))
    _sweep_done(out)


@sweep_app.command("resume")
def sweep_resume_cmd(
    sweep: SweepArg,
    address: str = typer.Option(None, "--address", help="Ray cluster address (default: local Ray)."),
    shared_storage: bool = typer.Option(False, "--shared-storage", help="With --address: the sweep's local folder is a mount every node shares (NFS)."),
    mlflow: str = typer.Option(None, "--mlflow", metavar="URI", help="MLflow tracking URI to log trials to; 'off' for none. Default: where the sweep's last launch or resume logged (none if it did not)."),
):
    """Continue a sweep (e.g. after a driver loss): unfinished and errored trials resume from their checkpoints, finished ones are not rerun.

    Example: rcig sweep resume quickstart
    """
    from orchestrator.sweep import resume

    try:
        out = resume(sweep, address=address, shared_storage=shared_storage, mlflow=mlflow)
    except _sweep_user_errors() as e:
        _sweep_fail(str(e))
    _sweep_done(out, sweep)


def _fmt(v, spec: str = ".4f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


@sweep_app.command("status")
def sweep_status_cmd(
    sweep: SweepArg,
    as_json: JsonOpt = False,
):
    """Per trial: state, step, metrics, checkpoint step, preemptions, failures, accelerator-hours (storage only, no Ray).

    Example: rcig sweep status quickstart --json
    """
    import json as _json

    from orchestrator.results import status

    try:
        st = status(sweep)
    except _sweep_user_errors() as e:
        _sweep_fail(str(e))
    if as_json:
        typer.echo(_json.dumps(st, indent=1, default=str))
        return
    counts = ", ".join(f"{n} {s}" for s, n in sorted(st["counts"].items())) or "no trials yet"
    typer.echo(f"sweep {st['sweep']} ({st['uri']}): {counts}")
    typer.echo(f"{'trial':46} {'state':10} {'step':>11} {'ckpt':>6} {'loss':>9} {'eval':>7} {'pre':>4} {'fail':>4} {'acc-h':>7}")
    stale = False
    for r in st["trials"]:
        step = f"{_fmt(r['step'], 'd', '0')}/{_fmt(r['steps'], 'd', '?')}"
        state = r["status"]
        if r["stale"]:
            state, stale = "RUNNING*", True
        typer.echo(f"{r['key'][:46]:46} {state:10} {step:>11} {_fmt(r['checkpoint_step'], 'd'):>6} "
                   f"{_fmt(r['metrics'].get('outer/loss'), '.4f'):>9} {_fmt(r['eval_mean'], '.4f'):>7} "
                   f"{r['preemptions']:>4} {r['failures']:>4} {r['accelerator_hours']:>7.3f}")
    if stale:
        typer.echo(f"* no update for over 3 minutes: if the sweep's driver is gone, run `rcig sweep resume {sweep}`")
    for d in st["damaged"]:
        typer.echo(f"DAMAGED {d['error']}")
    for r in st["trials"]:
        if r["error"]:
            typer.echo(f"\n{r['status']} {r['key']} (attempt {r['attempts']}), last traceback:")
            typer.echo("\n".join("  " + ln for ln in r["error"].rstrip().splitlines()[-15:]))
    unfinished = any(r["status"] not in ("COMPLETED", "STOPPED") for r in st["trials"])
    more = f"   |   rcig sweep resume {sweep}" if unfinished else ""
    typer.echo(f"next: rcig best {sweep}   |   rcig report {sweep}{more}")


@sweep_app.command("doctor")
def sweep_doctor_cmd(
    sweep: SweepArg,
    as_json: JsonOpt = False,
):
    """List what needs attention: damaged records, held or stale leases, trials RUNNING
    with no update, missing checkpoints or folders (storage only, no Ray). Exit 1 if any
    problem is found.

    Example: rcig sweep doctor quickstart
    """
    import json as _json

    from orchestrator.doctor import diagnose

    try:
        dx = diagnose(sweep)
    except _sweep_user_errors() as e:
        _sweep_fail(str(e))
    if as_json:
        typer.echo(_json.dumps(dx.to_dict(), indent=1))
    else:
        for f in dx.findings:
            typer.echo(f"{'problem' if f.problem else 'info':7} {f.kind:18} {f.path}: {f.detail}")
        typer.echo(f"{dx.sweep_uri}: {dx.trials} trial(s), {len(dx.problems)} problem(s)")
    if dx.problems:
        raise typer.Exit(1)


@app.command("best")
def best_cmd(
    sweep: SweepArg,
    metric: str = typer.Option(None, "--metric", help="Rank by this metric (default: the spec's validation metric, val/acc)."),
    top: int = typer.Option(5, "--top", help="How many trials to show."),
    as_json: JsonOpt = False,
):
    """Leaderboard of a sweep, best first by validation accuracy, with test accuracy and the
    random-real baseline (validation / test) beside it, accelerator-hours and cost. A
    trial stopped early is ranked on the intermediate estimate it reached (val from "probe").

    Example: rcig best quickstart --top 3
    """
    import json as _json

    from orchestrator.results import best

    try:
        rows = best(sweep, metric=metric, top=top)
    except _sweep_user_errors() as e:
        _sweep_fail(str(e))
    if as_json:
        typer.echo(_json.dumps(rows, indent=1, default=str))
        return
    typer.echo(f"{'#':>2} {'trial':46} {rows[0]['metric']:>12} {'val':>9} {'test±std':>13} "
               f"{'random val/test±std':>20} {'state':10} {'acc-h':>7} {'cost':>8}")
    for r in rows:
        val = (_fmt(r["val_mean"]) + ("(p)" if r.get("val_source") == "probe" else "")
               if r.get("val_mean") is not None else "-")
        ev = f"{_fmt(r['eval_mean'])}±{_fmt(r['eval_std'], '.3f')}" if r["eval_mean"] is not None else "-"
        rnd = (f"{_fmt(r.get('baseline_val_mean'))}/{_fmt(r['baseline_mean'])}±{_fmt(r['baseline_std'], '.3f')}"
               if r.get("baseline_mean") is not None else "-")
        typer.echo(f"{r['rank']:>2} {r['key'][:46]:46} {r['value']:>12.4f} {val:>9} {ev:>13} {rnd:>20} "
                   f"{r['status']:10} {r['accelerator_hours']:>7.3f} {_fmt(r['cost'], '.2f'):>8}")
    if any(r.get("val_source") == "probe" for r in rows):
        typer.echo("(p): the last intermediate validation estimate of a trial stopped early")
    typer.echo(f"next: rcig fetch {sweep} --to best/   |   rcig report {sweep}")


@app.command("fetch")
def fetch_cmd(
    sweep: SweepArg,
    to: str = typer.Option(..., "--to", help="Local folder to copy the files into."),
    trial: str = typer.Option(None, "--trial", help="Trial key (or unique prefix); default: the best."),
):
    """Download the best (by validation accuracy, as `rcig best` ranks) or the named trial's
    distilled.npz/.png, eval.json, config.json, split.json and final checkpoint.

    Example: rcig fetch quickstart --to best/
    """
    from orchestrator.results import fetch

    try:
        got = fetch(sweep, to, trial=trial)
    except _sweep_user_errors() as e:
        _sweep_fail(str(e))
    ev = "".join(f" {name} {got[k]:.4f}" for name, k in (("val", "val_mean"), ("test", "eval_mean"))
                 if got.get(k) is not None)
    ev = f" ({ev.strip()})" if ev else ""
    typer.echo(f"trial {got['key']}{ev} -> {got['to']}: {', '.join(got['files'])}")
    typer.echo(f"next: open {os.path.join(got['to'], 'distilled.png')}   |   rcig eval {got['to']}")


# ---- end section: sweep / best / fetch ----------------------------------------------

# ---- section: report ----------------------------------------------------------------
@app.command("report")
def report_cmd(
    sweep: SweepArg,
    out: str = typer.Option(None, "--out", help="HTML file to write (path or URI; default: <sweep>/report.html when local, else ./<name>-report.html)."),
    open_: bool = typer.Option(False, "--open", help="Open the report in the default browser."),
):
    """One self-contained HTML page of a sweep, live or finished: sortable leaderboard,
    distilled images, learned labels and curves per trial (storage only, no Ray).

    Example: rcig report quickstart --open
    """
    from orchestrator.manifest import ManifestError
    from orchestrator.report import ReportError, build_report, default_out, write_report
    from rcig.storage import StorageError

    try:
        rep = build_report(sweep)
        dest = write_report(rep, out or default_out(rep))
    except (ManifestError, ReportError, StorageError, FileNotFoundError) as e:
        _fail_one_line(e, with_type=False)
    for note in rep.notes:
        typer.echo(f"note: {note}", err=True)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(rep.counts.items()))
    typer.echo(f"report of {rep.name} ({counts}) -> {dest}")
    if open_:
        import webbrowser

        from rcig.storage import is_remote

        if is_remote(dest) or not webbrowser.open(f"file://{dest}"):
            typer.echo(f"note: could not open {dest} in a browser here; download and open it", err=True)
    typer.echo(f"next: open {dest}   |   rcig best {sweep}   |   rcig report {sweep} (again, to refresh)")


# ---- end section: report ------------------------------------------------------------

# ---- section: cluster ---------------------------------------------------------------
cluster_app = typer.Typer(
    help="Ray cluster launcher on GCP (infra/*.yaml): check the config, then ray up/down.",
    no_args_is_help=True,
)
app.add_typer(cluster_app, name="cluster")


def _cluster_run(action: str, config, yes: bool, dry_run: bool, spec=None) -> None:
    from orchestrator.cluster import ClusterConfigError, run_cluster_action

    try:
        code = run_cluster_action(action, config, yes=yes, dry_run=dry_run, spec_paths=spec or None)
    except ClusterConfigError as exc:
        _fail(str(exc))
    if code:
        raise typer.Exit(code)


@cluster_app.command("up")
def cluster_up(
    config: str = typer.Argument(..., help="Launcher YAML, e.g. infra/gcp-tpu.yaml"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before creating."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check only; print the ray command."),
    spec: list[str] = typer.Option(
        None, "--spec", help="Sweep spec that must fit the cluster (repeatable; default: shipped specs)."
    ),
) -> None:
    """Check CONFIG (Ray's validator, hardware vs resources, specs fit), then `ray up`."""
    _cluster_run("up", config, yes, dry_run, spec)


@cluster_app.command("down")
def cluster_down(
    config: str = typer.Argument(..., help="Launcher YAML the cluster was started with."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before deleting."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check only; print the ray command."),
) -> None:
    """Tear the cluster down (`ray down`); only Ray's validator runs first."""
    _cluster_run("down", config, yes, dry_run)


@cluster_app.command("status")
def cluster_status(
    config: str = typer.Argument(..., help="Launcher YAML the cluster was started with."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check only; print the ray command."),
) -> None:
    """Check CONFIG, then show the cluster's nodes and resources (`ray exec CONFIG 'ray status'`)."""
    _cluster_run("status", config, False, dry_run)


# ---- end section: cluster -----------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    app()
