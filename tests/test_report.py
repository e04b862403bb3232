"""`rcig report`: a tiny hand-made sweep folder (the manifest's own writers, real
distilled.npz / distilled.png / eval.json / metrics.jsonl files), its report opened in a
real headless Chromium behind a loopback proxy that logs every request the page makes.

No Ray is needed: the report reads storage only.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from orchestrator import manifest as mf
from orchestrator.report import build_report, default_out, write_report
from rcig import storage
from rcig.config import make_config, identity_hash
from rcig.export import image_grid_png
from rcig.run_folder import write_json

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CLASSES = ["zero", "one", "two"]
IPC = 2
SPEC = {"name": "tiny", "base": {"dataset": "digits", "ipc": IPC}, "metric": "eval/mean",
        "mode": "max", "cost": {"per_accelerator_hour": 1.35, "currency": "USD"},
        "search": {"space": {"outer.proto_lr": {"grid": [0.001, 0.003, 0.01, 0.03, 0.1]}}}}
# (proto_lr, state, eval mean or None, metric steps, distilled set written?)
TRIALS = [
    (0.001, mf.COMPLETED, 0.80, 20, True),
    (0.003, mf.COMPLETED, 0.85, 20, True),
    (0.01, mf.PREEMPTED, None, 12, False),
    (0.03, mf.ERROR, None, 5, False),
    (0.1, mf.PENDING, None, 0, False),
    (0.0003, mf.STOPPED, None, 10, False),  # stopped early by a scheduler (ASHA)
]
# Leaderboard: validation accuracy desc (the finished trials' final evaluation, the stopped
# one's last intermediate estimate), then the rest by state (preempted, pending, error).
EXPECTED_ORDER = [1, 0, 5, 2, 4, 3]
VAL_BASE = [0.60, 0.65, 0.55, 0.50, 0.0, 0.25]  # intermediate val/acc: base + 0.01 * step


def val_at(i: int, step: int) -> float:
    return round(VAL_BASE[i] + 0.01 * step, 4)


def _write_trial(sweep: str, lr: float, state: str, mean: float | None, steps: int,
                 distilled: bool, seed: int) -> str:
    params = {"outer.proto_lr": lr}
    cfg = make_config("digits", IPC, overrides=[f"outer.proto_lr={lr}", "steps=20"])
    key = mf.trial_key(params, cfg)
    rec = mf.TrialRecord(key=key, params=params, fingerprint=identity_hash(cfg), config=cfg.to_dict(),
                         status=state, step=steps or None, accelerator_s=900.0 * (seed + 1))
    tdir = mf.trial_uri(sweep, key)
    rng = np.random.default_rng(seed)
    if steps:
        rows = [{"step": s, "outer/loss": float(2.0 / s), "outer/acc": float(1 - 1 / (s + 1)),
                 "hinv/residual": float(1e-3 / s), "inner/lr": 0.01,
                 **({"val/acc": val_at(seed, s), "val/step": float(s)} if s % 5 == 0 else {})}
                for s in range(1, steps + 1)]
        storage.write_text(storage.join(tdir, "metrics.jsonl"),
                           "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "outer/lo')  # torn line
        rec.checkpoint_step = steps - steps % 5
    if state == mf.PREEMPTED:
        rec.preemptions, rec.attempts = 2, 3
        rec.history = [{"n": 1, "host": "node-a", "outcome": "preempted", "start_step": None, "end_step": 5},
                       {"n": 2, "host": "node-b", "outcome": "preempted", "start_step": 5, "end_step": 10}]
    if state == mf.ERROR:
        rec.failures, rec.attempts = 3, 3
        rec.errors = [{"attempt": 3, "at": 0.0,
                       "traceback": "Traceback (most recent call last):\nNonFiniteError: outer/loss is nan at step 5"}]
    if distilled:
        x_pixels = rng.random((len(CLASSES) * IPC, 8, 8, 1)).astype(np.float32)
        arrays = {"x_proto": x_pixels * 2 - 1, "x_pixels": x_pixels,
                  "y_proto": rng.normal(size=(len(CLASSES) * IPC, len(CLASSES))).astype(np.float32),
                  "log_temp": np.asarray(0.0, np.float32),
                  "y_class": np.repeat(np.arange(len(CLASSES), dtype=np.int32), IPC),
                  "class_names": np.asarray(CLASSES), "dataset": np.asarray("digits"),
                  "ipc": np.asarray(IPC), "use_flip": np.asarray(False), "step": np.asarray(steps),
                  "config_json": np.asarray(cfg.to_json())}
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        storage.write_bytes(storage.join(tdir, "distilled.npz"), buf.getvalue())
        storage.write_bytes(storage.join(tdir, "distilled.png"), image_grid_png(x_pixels, rows=len(CLASSES)))
    if mean is not None:
        ev = {"mean": mean, "std": 0.01, "accs": [mean - 0.01, mean + 0.01], "protocol": "rcig",
              "dataset": "digits", "ipc": IPC, "steps": 100, "runs": 2, "distill_steps": steps,
              "val_mean": mean + 0.02, "val": {"mean": mean + 0.02, "std": 0.01},
              "baseline": {"mean": 0.6, "std": 0.02, "accs": [0.58, 0.62]}}
        write_json(storage.join(tdir, "eval.json"), ev)
        rec.eval = ev
    mf.write_record(sweep, rec)
    return key


def make_sweep(root: Path, name: str = "tiny", which=range(len(TRIALS))) -> tuple[str, list[str]]:
    """A sweep folder with the trials `TRIALS[i] for i in which`; returns (uri, their keys)."""
    sweep = str(root / name)
    mf.write_manifest(sweep, name, SPEC, "tests/test_report.py", {"at": 0})
    keys = [_write_trial(sweep, *TRIALS[i], seed=i) for i in which]
    return sweep, keys


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report(sweep):
    uri, _ = sweep
    rep = build_report(uri)
    return rep, write_report(rep, default_out(rep))


# ---- the page itself --------------------------------------------------------------------
def test_report_content_order_states_and_notes(sweep, report):
    uri, keys = sweep
    rep, path = report
    assert path == os.path.join(uri, "report.html") and os.path.getsize(path) > 10_000
    assert [t.rec.key for t in rep.trials] == [keys[i] for i in EXPECTED_ORDER]
    assert [t.rank for t in rep.trials] == [1, 2, 3, None, None, None]
    page = Path(path).read_text()
    rows = re.findall(r'<tr data-key="([^"]+)" data-state="([^"]+)">', page)
    assert [html.unescape(k) for k, _ in rows] == [keys[i] for i in EXPECTED_ORDER]
    states = dict((html.unescape(k), s) for k, s in rows)
    assert states[keys[2]] == "PREEMPTED" and states[keys[3]] == "ERROR"
    assert "NonFiniteError: outer/loss is nan at step 5" in page  # the failed trial's error
    assert "0.8500 ± 0.0100" in page and "0.6000 ± 0.0200" in page  # eval and baseline
    # the pending trial has no metrics: a note, and its section still renders
    assert any(keys[4] in n and "no metrics yet (PENDING)" in n for n in rep.notes)
    assert page.count('<section class="trial"') == len(TRIALS)
    # images for the two finished trials, curves for every trial with metrics
    assert [sorted(t.images) for t in rep.trials[:2]] == [["curves", "grid", "labels"]] * 2
    assert [t.rec.key for t in rep.trials if "curves" in t.images] == [keys[i] for i in (1, 0, 5, 2, 3)]
    # a trial stopped early never wrote a distilled set: that is no problem worth a note
    assert not [n for n in rep.notes if keys[5] in n], rep.notes
    # no URL a browser could fetch: every src/href is a data: URI or an in-page anchor
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert attr.startswith(("data:", "#")), attr
    assert not re.search(r"(?i)https?://|@import|url\(", page)


def test_search_panel(sweep, report):
    """Metric vs the searched parameter (one point per trial with a value) and the
    intermediate val/acc curves, STOPPED and COMPLETED told apart."""
    from orchestrator.report import search_data

    _, keys = sweep
    rep, _ = report
    data = search_data(rep)
    points = {p["key"]: (p["state"], p["value"], p["params"]["outer.proto_lr"]) for p in data["points"]}
    assert points == {keys[1]: (mf.COMPLETED, pytest.approx(0.87), 0.003),
                      keys[0]: (mf.COMPLETED, pytest.approx(0.82), 0.001),
                      keys[5]: (mf.STOPPED, pytest.approx(val_at(5, 10)), 0.0003)}  # reached
    curves = {c["key"]: c for c in data["curves"]}
    assert set(curves) == {keys[i] for i in (0, 1, 2, 3, 5)}  # the pending trial has none
    stopped, done = curves[keys[5]], curves[keys[1]]
    assert (stopped["state"], stopped["steps"], stopped["final"]) == (mf.STOPPED, [5, 10], None)
    assert stopped["values"] == [val_at(5, 5), val_at(5, 10)]
    assert (done["state"], done["steps"], done["final"], done["final_step"]) == (
        mf.COMPLETED, [5, 10, 15, 20], pytest.approx(0.87), 20)
    assert curves[keys[2]]["state"] == mf.PREEMPTED and curves[keys[2]]["steps"] == [5, 10]
    # both figures drawn and on the page, in the search section, with the state counts
    assert sorted(rep.search) == ["curves", "params"]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in rep.search.values())
    section = re.search(r'<section id="search"[^>]*>.*?</section>', rep.html, re.S).group(0)
    assert 'data-completed="2" data-stopped="1"' in section
    assert 'class="search-params"' in section and 'class="search-curves"' in section
    assert "stopped early by the scheduler" in section and "final evaluation" in section


def test_search_figures_draw_without_a_search_space(tmp_path):
    """One point of the space (no searched parameter) and a trial with no metric yet."""
    from orchestrator import report_figures as figs

    png = figs.search_curves_figure([], "val/acc")
    assert png[:4] == b"\x89PNG"
    png = figs.search_params_figure(["seed", "model.kind"], [
        {"params": {"seed": 0, "model.kind": "conv"}, "value": 0.5, "state": mf.COMPLETED},
        {"params": {"seed": 1, "model.kind": "mlp"}, "value": 0.4, "state": mf.STOPPED}], "val/acc")
    assert png[:4] == b"\x89PNG"


def test_running_sweep_section(sweep, report):
    _, keys = sweep
    rep, _ = report
    live = re.search(r'<table id="in-progress".*?</table>', rep.html, re.S).group(0)
    assert keys[2] in html.unescape(live) and keys[4] in html.unescape(live)  # preempted, pending
    assert keys[0] not in html.unescape(live)
    assert ">12/20<" in live  # the preempted trial's latest step
    assert 'id="generated"' in rep.html


def test_damaged_trial_files_become_notes(tmp_path):
    uri, (key,) = make_sweep(tmp_path, "damaged", which=(1,))
    tdir = Path(mf.trial_uri(uri, key))
    (tdir / "distilled.npz").write_bytes(b"not a zip")
    (tdir / "eval.json").write_text("{half")
    (tdir / "metrics.jsonl").write_text('{"step": 1, "outer/lo\n[1, 2]\n')
    rep = build_report(uri)
    notes = "\n".join(rep.notes)
    assert f"trial {key}: no metrics yet (COMPLETED)" in notes
    assert f"{tdir / 'distilled.npz'} unreadable" in notes and f"{tdir / 'eval.json'} unreadable" in notes
    (t,) = rep.trials
    assert t.rank == 1 and t.eval["mean"] == 0.85  # eval from the trial record instead
    assert "grid" not in t.images and 'id="notes"' in rep.html


# ---- a real browser ------------------------------------------------------------------------
PROBE = """<script>
window.addEventListener('load', function () {
  function order() { return Array.prototype.map.call(
      document.querySelectorAll('#leaderboard tbody tr'), function (r) { return r.dataset.key; }); }
  function head(text) { return Array.prototype.find.call(
      document.querySelectorAll('#leaderboard thead th'), function (th) { return th.textContent.trim() === text; }); }
  var out = {order: order()};
  out.images = Array.prototype.map.call(document.images, function (im) {
    var s = im.closest('section');
    return {cls: im.className, key: s ? s.dataset.key : null, w: im.naturalWidth, scheme: im.src.split(':')[0]}; });
  out.sections = Array.prototype.map.call(document.querySelectorAll('section.trial'), function (s) {
    return [s.dataset.key, s.querySelector('.state').textContent]; });
  var search = document.getElementById('search');
  out.search = search ? {stopped: search.dataset.stopped, completed: search.dataset.completed,
    images: Array.prototype.map.call(search.querySelectorAll('img'), function (im) {
      return [im.className, im.naturalWidth]; })} : null;
  head('trial').click(); out.byTrial = order();
  head('eval mean ± std').click(); out.byEvalAsc = order();
  out.resources = performance.getEntriesByType('resource').map(function (e) { return e.name; });
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium on this machine (install it: apt-get install -y chromium); "
                "the browser checks of the report did not run")


# Chromium's own service traffic at startup, made even with --disable-background-networking
# (sign-in and search-engine connections); the page's requests are everything else.
BROWSER_SERVICE = re.compile(r"^(CONNECT (www|accounts)\.google\.com:443|GET http://clients\d*\.google\.com/"
                             r"|GET http://report\.test/favicon\.ico)")


class _Proxy:
    """Loopback HTTP proxy for Chromium: serves the page at http://report.test/, answers
    anything else with 404 (CONNECT with 403), and logs every request it receives
    ("METHOD target", plus " <- referer" when the request names one)."""

    def __init__(self, page: bytes):
        self.requests: list[str] = []
        self.page = page
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                ref = self.headers.get("Referer")
                outer.requests.append(f"{self.command} {self.path}" + (f" <- {ref}" if ref else ""))
                if self.path in ("http://report.test/report.html", "/report.html"):
                    page = outer.page
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                else:
                    self.send_error(404)

            def do_CONNECT(self):
                outer.requests.append(f"CONNECT {self.path}")
                self.send_error(403)

            do_POST = do_HEAD = do_PUT = do_OPTIONS = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _run_chromium(browser: str, proxy: _Proxy, profile: Path, *extra: str) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--disable-extensions", "--no-first-run", "--mute-audio",
           "--dns-prefetch-disable", "--disable-domain-reliability", "--no-pings",
           "--disable-features=NetworkTimeServiceQuerying,PreconnectToSearch,OptimizationHints,"
           "MediaRouter,Translate,AutofillServerCommunication",
           f"--user-data-dir={profile}", f"--proxy-server={proxy.address}",
           "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=5000",
           *extra, "http://report.test/report.html"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_report_in_headless_chromium(sweep, report, tmp_path):
    browser = _chromium()
    _, keys = sweep
    rep, _ = report
    page = rep.html.replace("</body>", PROBE + "</body>").encode()
    proxy = _Proxy(page)
    try:
        dom = _run_chromium(browser, proxy, tmp_path / "profile", "--dump-dom")
        m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
        assert m, f"probe did not run; DOM tail: {dom[-500:]}"
        got = json.loads(html.unescape(m.group(1)))
        page_requests = list(proxy.requests)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "report.png"
        shot.unlink(missing_ok=True)
        proxy.page = rep.html.encode()  # the page as users see it, without the probe
        _run_chromium(browser, proxy, tmp_path / "profile2", f"--screenshot={shot}",
                      "--window-size=1280,2400", "--hide-scrollbars")
    finally:
        proxy.close()
    # one row per trial, best eval first
    assert got["order"] == [keys[i] for i in EXPECTED_ORDER]
    # every trial's image grid decoded, every image is a data: URI
    grids = {im["key"]: im["w"] for im in got["images"] if im["cls"] == "grid"}
    assert grids.keys() == {keys[0], keys[1]} and all(w > 0 for w in grids.values()), grids
    assert all(im["w"] > 0 and im["scheme"] == "data" for im in got["images"]), got["images"]
    assert sum(im["cls"] == "curves" for im in got["images"]) == len(TRIALS) - 1  # not the pending one
    # the search panel: both figures decoded, stopped and finished trials counted apart
    assert got["search"]["stopped"] == "1" and got["search"]["completed"] == "2", got["search"]
    assert sorted(c for c, _ in got["search"]["images"]) == ["search-curves", "search-params"]
    assert all(w > 0 for _, w in got["search"]["images"]), got["search"]
    # the states the page shows, preempted and failed among them
    shown = dict(got["sections"])
    assert shown[keys[2]] == "PREEMPTED" and shown[keys[3]] == "ERROR"
    # column sorting works: by trial key ascending; by eval ascending with blanks last
    assert got["byTrial"] == sorted(keys)
    assert got["byEvalAsc"][:2] == [keys[0], keys[1]]
    # no network: besides Chromium's own service traffic, the only request to reach the
    # proxy is the page itself, and no request at all names the page as its referer
    from_page = [r for r in page_requests if not BROWSER_SERVICE.match(r)]
    assert from_page == ["GET http://report.test/report.html"], page_requests
    assert not [r for r in page_requests if "<- " in r], page_requests
    assert not [r for r in got["resources"] if not r.startswith("data:")], got["resources"]
    assert shot.exists() and shot.stat().st_size > 10_000


# ---- bad input via the CLI ---------------------------------------------------------------
@pytest.fixture()
def runner():
    from cli import app

    def invoke(*args: str):
        return CliRunner().invoke(app, list(args))

    return invoke


def test_cli_unknown_sweep(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("RCIG_SWEEP_ROOT", str(tmp_path))
    res = runner("report", "nope")
    assert res.exit_code == 1
    assert "no sweep named 'nope'" in res.output and "Traceback" not in res.output
    missing = tmp_path / "elsewhere" / "gone"
    res = runner("report", str(missing))
    assert res.exit_code == 1 and f"{missing}: no rcig sweep here" in res.output
    assert "Traceback" not in res.output and not missing.exists()


def test_cli_empty_sweep(runner, tmp_path):
    sweep = tmp_path / "empty"
    mf.write_manifest(str(sweep), "empty", SPEC, "test", {"at": 0})
    res = runner("report", str(sweep))
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "has no trials yet" in lines[0] and str(sweep) in lines[0], res.output
    assert not (sweep / "report.html").exists()


def test_cli_trial_without_metrics_still_reports_others(runner, tmp_path):
    sweep, (done, pending) = make_sweep(tmp_path, "partial", which=(1, 4))
    out = tmp_path / "r.html"
    res = runner("report", sweep, "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert f"note: trial {pending}: no metrics yet (PENDING)" in res.output
    assert f"-> {out}" in res.output and "next: open" in res.output
    page = out.read_text()
    assert page.count('class="grid"') == 1 and page.count('<section class="trial"') == 2
    assert re.findall(r'<tr data-key="([^"]+)" data-state', page) == [done, pending]
    assert not (Path(sweep) / "report.html").exists()  # --out respected


@pytest.mark.gcs
def test_report_from_bucket(gcs_bucket, tmp_path, monkeypatch):
    local, keys = make_sweep(tmp_path, "remote", which=(0, 1, 3))
    remote = storage.join(gcs_bucket, "sweeps", "remote")
    for dirpath, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), local)
            storage.write_bytes(storage.join(remote, *rel.split(os.sep)),
                                Path(dirpath, f).read_bytes())
    monkeypatch.chdir(tmp_path)
    rep = build_report(remote)
    dest = write_report(rep, default_out(rep))
    assert dest == str(tmp_path / "remote-report.html")
    assert [t.rec.key for t in rep.trials] == [keys[1], keys[0], keys[2]]
    assert Path(dest).read_text().count('class="grid"') == 2
    assert [t.rec.status for t in rep.trials] == [mf.COMPLETED, mf.COMPLETED, mf.ERROR]
