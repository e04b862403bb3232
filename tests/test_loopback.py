"""Every Ray the tests start binds 127.0.0.1 (never the machine's network address).

`conftest._ray_stays_on_loopback` checks every raylet the suite starts, after each test;
this module starts Ray the way `rcig sweep launch` does and looks at the processes.
"""

from __future__ import annotations

import pytest

from conftest import raylet_node_ips

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_local_ray_of_a_sweep_binds_loopback():
    import ray

    from orchestrator.sweep import init_ray

    if ray.is_initialized():  # left by another module: this test starts its own
        ray.shutdown()
    init_ray(num_cpus=1)  # as `rcig sweep launch` without --address starts it
    try:
        ips = raylet_node_ips()
        assert ips, "no raylet found among this test's processes"
        assert set(ips.values()) == {"127.0.0.1"}, ips
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    finally:
        ray.shutdown()
