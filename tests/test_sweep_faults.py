"""Node loss on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`).

The head has no CPUs, so trials run on the two 1-CPU worker nodes. Removing the node
that runs a trial (after its first checkpoint) makes Tune rerun it on the other node,
where it resumes from its last checkpoint and ends equal to an uninterrupted run.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from orchestrator import manifest as mf
from orchestrator.results import status
from orchestrator.sweep import SweepError, launch

from conftest import assert_same_distilled, raylet_node_ips, wait_for
from test_sweep import QUICKSTART, TEST_ENV, TINY

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(TEST_ENV)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    for _ in range(2):
        c.add_node(num_cpus=1, resources={"slot": 1}, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    from orchestrator.sweep import init_ray

    init_ray(address=c.address)  # as `rcig sweep launch --address` connects
    assert set(raylet_node_ips().values()) == {"127.0.0.1"}  # every node on loopback
    yield c
    ray.shutdown()
    c.shutdown()


def test_preflight_rejects_a_bundle_no_node_offers(cluster, tmp_path):
    with pytest.raises(SweepError, match=r"resources: no node of the cluster .* offers \{'CPU': 4.0\}"):
        launch(QUICKSTART, storage_uri=str(tmp_path), address=cluster.address, shared_storage=True,
               sets=TINY + ["resources.cpu=4", "search.space={}"])
    assert not (tmp_path / "quickstart").exists()


def test_node_loss_resumes_elsewhere_and_matches_uninterrupted(cluster, tmp_path):
    sets = TINY + ["steps=40", "checkpoint.every_steps=5", "search.space={}"]
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(out=launch(
        QUICKSTART, storage_uri=str(tmp_path), name="lossy", address=cluster.address,
        shared_storage=True, sets=sets)))
    th.start()
    sweep = str(tmp_path / "lossy")

    def checkpointed():
        recs = mf.read_records(sweep)
        r = recs[0] if recs else None
        return r if r and (r.checkpoint_step or 0) >= 5 and r.history and r.history[-1].get("node_id") else None

    rec = wait_for(checkpointed, 240, "the first checkpoint")
    victim = next(n for n in cluster.list_all_nodes() if n.node_id == rec.history[-1]["node_id"])
    t_kill = time.time()
    cluster.remove_node(victim, allow_graceful=False)
    th.join(timeout=400)
    assert not th.is_alive() and box["out"].counts == {mf.COMPLETED: 1}

    rec = mf.read_records(sweep)[0]
    first, second = rec.history[0], rec.history[-1]
    assert rec.preemptions == 1 and rec.failures == 0 and rec.attempts == 2, rec.history
    assert first["outcome"] in ("lost", "preempted") and second["outcome"] == "completed"
    assert second["node_id"] != first["node_id"]
    assert second["start_step"] >= 5  # resumed from a checkpoint, not from scratch
    row = status(sweep)["trials"][0]
    assert (row["preemptions"], row["failures"], row["status"]) == (1, 0, "COMPLETED")
    print(f"node kill -> next attempt start: {second['started'] - t_kill:.1f} s")

    # The same trial without interruption, in another sweep folder: same distilled set.
    ref = launch(QUICKSTART, storage_uri=str(tmp_path), name="steady", address=cluster.address,
                 shared_storage=True, sets=sets)
    assert ref.counts == {mf.COMPLETED: 1}
    assert_same_distilled(Path(sweep) / "trials" / rec.key / "distilled.npz",
                          tmp_path / "steady" / "trials" / rec.key / "distilled.npz")
