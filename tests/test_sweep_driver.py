"""Driver loss: kill `rcig sweep launch` (and the local Ray it started) mid-sweep, then
`rcig sweep resume NAME` finishes the sweep: finished trials are not rerun, the
interrupted one resumes from its checkpoint, and max_concurrent holds throughout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator import manifest as mf

from conftest import loopback_env, wait_for
from test_sweep import QUICKSTART, ROOT, TEST_ENV, TINY

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _max_overlap(recs: list[mf.TrialRecord]) -> int:
    events = []
    for r in recs:
        for att in r.history:
            events.append((att["started"], 1))
            events.append((att.get("ended") or att.get("updated") or att["started"], -1))
    level = peak = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        level += d
        peak = max(peak, level)
    return peak


def test_driver_loss_then_resume(tmp_path):
    env = {**os.environ, **loopback_env(), **TEST_ENV, "RCIG_SWEEP_ROOT": str(tmp_path)}
    sets = TINY + ["steps=40", "max_concurrent=1", "search.space.seed={grid: [0, 1]}", "name=drv"]
    argv = [sys.executable, str(ROOT / "cli.py"), "sweep", "launch", QUICKSTART]
    for s in sets:
        argv += ["--set", s]
    log = open(tmp_path / "launch.log", "w")
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    sweep = str(tmp_path / "drv")
    try:
        def one_done_one_running():
            recs = mf.read_records(sweep)
            done = [r for r in recs if r.status == mf.COMPLETED]
            running = [r for r in recs if r.status == mf.RUNNING and (r.checkpoint_step or 0) >= 5]
            return (done, running) if done and running else None

        done, running = wait_for(one_done_one_running, 300, "one finished and one running trial", every=0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started: all gone
        proc.wait()
    time.sleep(1)

    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sweep", "resume", "drv"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "sweep drv: 2 COMPLETED" in p.stdout and "next: rcig best drv" in p.stdout
    recs = {r.key: r for r in mf.read_records(sweep)}
    assert len(recs) == 2 and all(r.status == mf.COMPLETED for r in recs.values())
    assert all(recs[r.key].attempts == 1 for r in done)  # finished trials not rerun
    again = recs[running[0].key]
    assert again.attempts == 2 and again.history[-1]["start_step"] >= 5
    assert again.preemptions == 1 and again.failures == 0
    assert _max_overlap(list(recs.values())) <= 1  # max_concurrent=1, before and after resume
