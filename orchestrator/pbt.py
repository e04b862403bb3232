"""Population-based training over a sweep's trials: Tune's PBT, with checkpoints by pointer.

`scheduler: {type: pbt, ...}` (`orchestrator.search.PbtOptions`) builds `RcigPBT`, Tune's
`PopulationBasedTraining` told three things about these trials:

- **Ranking**: on the intermediate metric (`val/acc`) at the step it was measured
  (`val/step`, the PBT time attribute), every `perturbation_interval` outer steps. A
  trial's final report (with `eval/mean`) and budget notices are never acted on.
- **Exploit by pointer**: a top trial's "checkpoint" is a pointer written by the driver
  into the donor's Ray trial folder: `pointer.json` = the donor's trial folder URI, key,
  parameters and the step it was ranked at. Tune hands that pointer to the exploiting
  trial (as the checkpoint it restores); the checkpoint bytes stay where the donor
  committed them: no second upload through Tune.
- **Explore**: the exploiting trial gets the donor's configuration with the fields of
  `mutations` perturbed (Tune's explore) but keeps its own hidden keys (`_rcig_*`: its
  sample index and its folder key), so it stays the same trial.

**Taking the donor's state** (`apply_exploit`, called by `orchestrator.trial` before the
worker starts, when Tune gave the attempt a pointer it has not applied yet). Under the
trial folder's lease (so an earlier attempt still committing its own last step is waited
out) it copies the donor's committed Orbax step `<donor>/checkpoints/<step>/` into its own
`checkpoints/`, replacing its own steps, with the step's `config` item rewritten to the
trial's new (perturbed) config; the arrays are copied byte for byte. The worker then
resumes from that step by its normal path, so the state it continues from *is* the
donor's state at that step. The donor's step is the one it was ranked at once that save
is committed; if retention (`checkpoint.keep`) removed it meanwhile, the committed step
nearest to it (recorded as such). `metrics.jsonl` becomes the donor's rows up to that
step (the history of the state now held); the trial's own rows are kept beside it.

**Identity.** A trial's folder key hashes its run identity (`manifest.trial_key`), and an
exploit changes its config. The key is therefore fixed when the trial is added to the
sweep, from its *initial* parameters and sample index (the same key the folder got), and
carried in the trial's config under `_rcig_origin` (`orchestrator.trial.ORIGIN_KEY`),
which explore never overwrites: the folder stays the trial's own for its whole life, and
Tune's experiment state (which holds the config) gives it back after a driver restart.
Without Ray's state, `rcig sweep resume` rebuilds each trial from its record, which
names its key and its current parameters (`orchestrator.sweep`), and the trials run to
their end without further exploits.

**Lineage**: `<trial>/pbt_lineage.json` lists every exploit (donor key and folder, the
step copied and the step pointed to, the donor's and the new parameters, which fields
were perturbed); the trial's record holds its current parameters and config. Applying a
pointer is idempotent: an attempt whose pointer is in the lineage resumes from its own
checkpoints (a restart after a preemption, or after a driver restart).

A PBT pause (Tune stops a trial to let another run, or to exploit) ends the attempt like
a preemption: the worker commits a checkpoint and the trial resumes from it.

Asynchronous PBT (the default) ranks a trial against the others' latest estimates when it
reports; trials much shorter than their compile can run past each other before any
decision (the tests use `synch: true`, where every decision waits for the whole
population).

Example:
    >>> sched = build_pbt(spec.scheduler, spec)      # doctest: +SKIP
    >>> lineage("sweeps/pbt/trials/<key>")["exploits"][0]["donor_key"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from typing import Any, Mapping

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from orchestrator import manifest as mf
from orchestrator.trial import ORIGIN_KEY, TERMINAL, key_of, resolve, trial_params
from rcig import storage

LINEAGE = "pbt_lineage.json"
POINTER = "pointer.json"
POINTER_PREFIX = "rcig_pbt_pointer"
COMMIT = "commit_success.txt"
OWN_HISTORY = "pbt"  # <trial>/pbt/metrics.before_exploit_<n>.jsonl


# ---- the scheduler (driver side) --------------------------------------------------------
def build_pbt(opts: Any, spec: Any) -> Any:
    """`RcigPBT` for a validated spec's `PbtOptions`."""
    from orchestrator.search import DISTRIBUTIONS, pbt_mutations

    mutations: dict[str, Any] = {}
    for key in pbt_mutations(opts, spec.space):
        (kind, values), = spec.space[key].items()
        d = DISTRIBUTIONS[kind]
        mutations[key] = list(values) if d.discrete else d.tune(list(values))
    return RcigPBT(
        spec, time_attr="val/step", metric=opts.metric, mode=opts.mode,
        perturbation_interval=opts.perturbation_interval, burn_in_period=opts.burn_in,
        hyperparam_mutations=mutations, quantile_fraction=opts.quantile_fraction,
        resample_probability=opts.resample_probability,
        perturbation_factors=tuple(opts.perturbation_factors), log_config=False,
        require_attrs=False, synch=opts.synch)


class RcigPBT(PopulationBasedTraining):
    """Tune's PBT; exploits hand over a pointer (see the module docstring)."""

    def __init__(self, spec: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self._spec = spec
        self._trial_steps: dict[str, int] = {}

    def on_trial_add(self, tune_controller, trial) -> None:
        if ORIGIN_KEY not in trial.config:  # its folder, fixed from its initial config
            trial.config[ORIGIN_KEY] = key_of(self._spec, trial.config, trial.trial_id)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if ("eval/mean" in result or result.get(TERMINAL) or self._metric not in result
                or self._time_attr not in result
                or result[self._time_attr] >= self._steps(trial)):
            return TrialScheduler.CONTINUE  # the last step, final reports, notices
        return super().on_trial_result(tune_controller, trial, result)

    def _steps(self, trial) -> int:
        """The outer steps the trial runs (`steps` may be searched, not perturbed)."""
        if trial.trial_id not in self._trial_steps:
            self._trial_steps[trial.trial_id] = resolve(self._spec, trial.config)[2].steps
        return self._trial_steps[trial.trial_id]

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
        state = self._trial_state[trial]
        if trial in upper_quantile:  # a pointer to its committed step, not a save
            state.last_checkpoint = write_pointer(trial, state.last_result)
            self._num_checkpoints += 1
        else:
            state.last_checkpoint = None
        if trial in lower_quantile:
            donor = random.choice(upper_quantile)
            donor_state = self._trial_state[donor]
            if not donor_state.last_checkpoint and donor_state.last_result:
                # It was ranked before the others had scores (asynchronous PBT): its last
                # ranked step is committed all the same, so point to that.
                donor_state.last_checkpoint = write_pointer(donor, donor_state.last_result)
            if not donor_state.last_checkpoint:
                return
            self._exploit(tune_controller, trial, donor)

    def choose_trial_to_run(self, tune_controller):
        """Synchronous PBT runs only trials behind the next decision point. A trial that
        reports past it (it resumed from a later checkpoint: after a pause, a driver
        restart) leaves every waiting trial at or beyond it, and Tune's PBT would then
        wait for ever; move the point one interval past the earliest waiting trial."""
        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None or not self._synch:
            return trial
        trials = tune_controller.get_trials()
        waiting = [t for t in trials if t.status in (t.PENDING, t.PAUSED) and t in self._trial_state]
        if waiting and not any(t.status == t.RUNNING for t in trials):
            earliest = min(self._trial_state[t].last_train_time for t in waiting)
            self._next_perturbation_sync = earliest + self._perturbation_interval
            trial = super().choose_trial_to_run(tune_controller)
        return trial

    def _get_new_config(self, trial, trial_to_clone):
        new, operations = super()._get_new_config(trial, trial_to_clone)
        own = {k: v for k, v in trial.config.items() if k.startswith("_rcig")}
        new = {k: v for k, v in new.items() if not k.startswith("_rcig")}
        new.update(own)  # its own sample index and folder key
        return new, operations


def write_pointer(trial: Any, result: Mapping[str, Any]) -> Any:
    """Write `pointer.json` for `trial`'s state at the step `result` ranked it on into its
    Ray trial folder; return it as a Tune `Checkpoint` (what Tune passes on)."""
    from ray.tune import Checkpoint

    step = int(result["val/step"])
    ckpt_uri = str(result.get("rcig/checkpoint_uri", ""))
    doc = {
        "id": uuid.uuid4().hex,
        "donor_key": result.get("rcig/trial_key"),
        "donor_uri": ckpt_uri[: -len("/checkpoints")] if ckpt_uri.endswith("/checkpoints") else ckpt_uri,
        "step": step,
        "metric": {k: result[k] for k in ("val/acc",) if k in result},
        "donor_params": trial_params(trial.config),
        "donor_trial_id": trial.trial_id,
        "made": time.time(),
    }
    fs = trial.storage.storage_filesystem
    path = f"{trial.storage.trial_fs_path}/{POINTER_PREFIX}_{step:06d}_{doc['id'][:8]}"
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{POINTER}") as f:
        f.write(json.dumps(doc, sort_keys=True, default=str).encode())
    return Checkpoint(path=path, filesystem=fs)


def read_pointer(checkpoint: Any) -> dict[str, Any] | None:
    """The pointer inside a Tune checkpoint (None: it is not one of ours)."""
    fs, path = checkpoint.filesystem, checkpoint.path
    try:
        with fs.open_input_stream(f"{path}/{POINTER}") as f:
            doc = json.loads(f.read().decode())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("donor_uri") else None


# ---- taking the donor's state (trial side, before the worker) -------------------------------
def lineage_uri(trial_uri: str) -> str:
    return storage.join(trial_uri, LINEAGE)


def lineage(trial_uri: str) -> dict[str, Any]:
    """The trial's exploit history (`{"exploits": []}` if it never exploited)."""
    try:
        doc = json.loads(storage.read_text(lineage_uri(trial_uri)))
    except FileNotFoundError:
        return {"exploits": []}
    doc.setdefault("exploits", [])
    return doc


def _committed(run_uri: str) -> list[int]:
    """Committed steps of a run folder, ascending: a step folder under its final name that
    holds Orbax's commit marker (no Orbax import: this runs in the trial's actor)."""
    ckpt = storage.join(run_uri, "checkpoints")
    out = []
    for name in storage.listdir(ckpt):
        if name.isdigit() and storage.exists(storage.join(ckpt, name, COMMIT)):
            out.append(int(name))
    return sorted(out)


def donor_step(donor_uri: str, step: int, wait_s: float) -> int:
    """The donor's committed step to copy: `step` once committed (its save may still be in
    flight when the exploit starts), else the committed step nearest to it (a later one
    first: retention removed it). Raises FileNotFoundError if the donor has none."""
    deadline = time.time() + wait_s
    while True:
        steps = _committed(donor_uri)
        if step in steps:
            return step
        if any(s > step for s in steps) or time.time() >= deadline:
            break  # saves commit in order: a later step committed means `step` is gone
        time.sleep(0.5)
    if not steps:
        raise FileNotFoundError(f"{donor_uri}: no committed checkpoint to exploit")
    later = [s for s in steps if s > step]
    return later[0] if later else steps[-1]


def _files(uri: str) -> list[str]:
    """Paths (relative to `uri`) of every file under a folder."""
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    return sorted(p[len(root) + 1:] for p in fs.find(root) if p.startswith(root + "/"))


def copy_step(donor_uri: str, step: int, trial_uri: str, config: Mapping[str, Any]) -> list[str]:
    """Make the donor's committed step `step` this trial's only checkpoint: every file
    copied as it is, except the step's `config` item, which names the trial's own config
    (what the worker's resume check compares). Local: written under a temporary name,
    then renamed into place; gs://: the step's commit marker is written last. Returns
    the files copied."""
    src = storage.join(donor_uri, "checkpoints", str(step))
    files = _files(src)
    if COMMIT not in files:
        raise FileNotFoundError(f"{src}: not a committed checkpoint step")
    dst_ckpt = storage.join(trial_uri, "checkpoints")
    local = not storage.is_remote(trial_uri)
    stage = storage.join(trial_uri, f"pbt_incoming_{step}") if local else storage.join(dst_ckpt, str(step))
    if local:
        storage.remove(stage, recursive=True)
    else:
        storage.remove(dst_ckpt, recursive=True)
    config_text = json.dumps(json.loads(json.dumps(dict(config))))
    fs, _ = storage.filesystem(src)
    for rel in sorted(files, key=lambda r: r == COMMIT):  # the step's marker last
        s_uri, d_uri = storage.join(src, rel), storage.join(stage, rel)
        if rel.startswith("config/") and rel != f"config/{COMMIT}" and _is_config(s_uri):
            storage.write_text(d_uri, config_text)
            continue
        if local:
            os.makedirs(os.path.dirname(d_uri), exist_ok=True)
        fs.copy(storage.filesystem(s_uri)[1], storage.filesystem(d_uri)[1])
    if local:
        storage.remove(dst_ckpt, recursive=True)
        os.makedirs(dst_ckpt, exist_ok=True)
        os.rename(stage, storage.join(dst_ckpt, str(step)))
    return files


def _is_config(uri: str) -> bool:
    try:
        doc = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and "dataset" in doc and "steps" in doc


def _take_history(donor_uri: str, step: int, trial_uri: str, n: int) -> None:
    """metrics.jsonl: the donor's rows up to `step` (read in any of `rcig.run_folder`'s
    forms, written as one file, the trial's own parts removed); the trial's own rows move
    to `pbt/metrics.before_exploit_<n>.jsonl`."""
    from rcig.run_folder import METRICS_JSONL, METRICS_PARTS, read_metrics

    def dump(rows: list[dict]) -> str:
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)

    own = read_metrics(trial_uri)
    if own:
        storage.write_text(storage.join(trial_uri, OWN_HISTORY, f"metrics.before_exploit_{n}.jsonl"), dump(own))
    rows = read_metrics(donor_uri, upto=step)
    storage.remove(storage.join(trial_uri, METRICS_PARTS), recursive=True)
    storage.write_text(storage.join(trial_uri, METRICS_JSONL), dump(rows))
    storage.remove(storage.join(trial_uri, "eval.partial.json"))


def apply_exploit(params: Mapping[str, Any], cfg: Any, trial_uri: str,
                  store: mf.RecordStore) -> mf.TrialRecord | None:
    """If Tune started this attempt from a PBT pointer not yet applied, take the donor's
    state (see the module docstring) for the trial's (perturbed) `params` and `cfg`, and
    return the updated record; else None."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    pointer = read_pointer(ckpt) if ckpt is not None else None
    if pointer is None or pointer.get("donor_key") == store.key:
        return None
    done = lineage(trial_uri)
    if any(e.get("pointer") == pointer["id"] for e in done["exploits"]):
        return None  # applied by an earlier attempt of this trial
    from rcig.lease import acquire

    params = dict(params)
    lease = acquire(trial_uri, info={"attempt": "pbt-exploit"})
    try:
        before = _committed(trial_uri)
        wait_s = float(os.environ.get("RCIG_PBT_DONOR_WAIT_S", "120"))
        for tries in range(3):  # the donor's retention may remove a step while it is copied
            step = donor_step(pointer["donor_uri"], int(pointer["step"]), wait_s)
            try:
                copy_step(pointer["donor_uri"], step, trial_uri, cfg.to_dict())
                break
            except FileNotFoundError:
                if tries == 2:
                    raise
        n = len(done["exploits"]) + 1
        _take_history(pointer["donor_uri"], step, trial_uri, n)
        rec = mf.read_record(store.sweep_uri, store.key)
        donor_params = pointer.get("donor_params") or {}
        entry = {
            "n": n, "at": time.time(), "pointer": pointer["id"],
            "donor_key": pointer["donor_key"], "donor_uri": pointer["donor_uri"],
            "donor_trial_id": pointer.get("donor_trial_id"),
            "pointer_step": int(pointer["step"]), "step": step,
            "donor_metric": pointer.get("metric"), "own_steps_replaced": before,
            "donor_params": donor_params, "params": params,
            "perturbed": {k: [donor_params.get(k), v] for k, v in params.items()
                          if donor_params.get(k) != v},
        }
        if "origin" not in done:
            done["origin"] = {"key": store.key, "params": rec.params if rec else None}
        done["key"] = store.key
        done["exploits"].append(entry)
        storage.write_text(lineage_uri(trial_uri), json.dumps(done, indent=1, sort_keys=True, default=str))
    finally:
        lease.release()

    def take(cur: mf.TrialRecord | None) -> mf.TrialRecord | None:
        if cur is None:
            return None
        from rcig.config import identity_hash

        cur.params, cur.config, cur.fingerprint = dict(params), cfg.to_dict(), identity_hash(cfg)
        cur.step = cur.checkpoint_step = step
        return cur

    return store.update(take)
