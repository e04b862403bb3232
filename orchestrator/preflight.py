"""Connect the sweep driver to Ray, and check before any trial starts that the cluster can run one.

- `init_ray(address)`: connect to a cluster (`host:port`, `auto`, `ray://host:port`) or
  start Ray on this machine. Before connecting to a `host:port`, the GCS is asked once
  whether it accepts this client's Ray auth token, so a missing or wrong token is one
  line saying where Ray looks for it (not a 20 s hang and a bare "Failed to connect").
  `RCIG_RAY_NODE_IP` (the test suite sets 127.0.0.1) is the address a local Ray binds;
  unset, Ray picks the machine's address as usual.
- `check_storage(sweep_uri, address, shared_storage)`: a sweep on a cluster needs storage
  every node reaches (`gs://`), or a local path the user declares shared (`--shared-storage`).
- `cluster_offers(bundle)`: the one place that reads what a cluster can give a trial: its
  live nodes (the autoscaler state service of the GCS, what `ray status` reads), and, if
  no live node can hold the bundle, the autoscaler's own answer to "could you add a node
  that holds it?". That answer comes from asking the autoscaler for the bundle as a
  cluster resource constraint (`ray.autoscaler.v2.sdk.request_cluster_resources`, the
  call behind `ray.autoscaler.sdk.request_resources`), reading whether it reports the
  constraint infeasible, and withdrawing the request. This works the same on a
  cluster-launcher cluster, on KubeRay, and through Ray Client (the read then runs as a
  zero-CPU task on the cluster), because the autoscaler is the only party that knows the
  node types, their limits, and KubeRay's worker groups.
- `preflight(spec, address)`: raise `SweepError` (one line: the bundle, why nothing fits,
  the node types) when neither a live node nor a node the autoscaler can add holds one
  trial. A trial over several hosts (`resources.hosts`, a TPU slice type) needs that many
  distinct nodes, one per host bundle (its placement group is STRICT_SPREAD); the
  autoscaler is asked for all of its bundles at once. Without `--address` the local Ray has no autoscaler, so a spec asking for a GPU on
  a machine without one is refused instead of PENDING forever.

Example:
    >>> covers({"CPU": 4, "TPU": 4, "accelerator_type:TPU-V4": 1}, {"CPU": 1, "TPU": 4})
    True
    >>> shortfall({"CPU": 1, "TPU": 8}, {"tpu_worker": {"CPU": 1, "TPU": 4}})
    'TPU 8 > at most 4 on any node type'
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

NODE_IP_ENV = "RCIG_RAY_NODE_IP"          # address a local Ray binds (tests: 127.0.0.1)
PREFLIGHT_TIMEOUT_ENV = "RCIG_PREFLIGHT_TIMEOUT_S"  # how long to wait for the autoscaler's answer
_HIDDEN = ("node:", "memory", "object_store_memory")


def _sweep_error(msg: str) -> Exception:
    from orchestrator.sweep import SweepError

    return SweepError(msg)


# ---- connecting -------------------------------------------------------------------------


def _token_source() -> tuple[str | None, str]:
    """(token, where it came from), in the order Ray's token loader reads them."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return open(os.path.expanduser(path)).read().strip(), f"$RAY_AUTH_TOKEN_PATH ({path})"
        except OSError:
            return None, f"$RAY_AUTH_TOKEN_PATH ({path}, unreadable)"
    default = os.path.expanduser("~/.ray/auth_token")
    try:
        return open(default).read().strip(), default
    except OSError:
        return None, default


TOKEN_WHERE = ("Ray reads the token from $RAY_AUTH_TOKEN, else the file named by "
               "$RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, and sends it only with RAY_AUTH_MODE=token")


def token_problem(address: str, timeout_s: float = 5.0) -> str | None:
    """Ask the GCS at `host:port` whether it accepts the token this client would send.

    Returns one line describing the problem, or None (accepted, no authentication, or the
    GCS did not answer: `ray.init` then reports that itself).
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token, where = _token_source()
    sends = os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and token
    metadata = (("authorization", f"Bearer {token}"),) if sends else None
    try:
        with grpc.insecure_channel(address) as channel:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata)
        return None
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            return None
    head = f"cannot connect to the Ray cluster at {address}: it requires a Ray auth token"
    if sends:
        return f"{head} and rejected the one from {where}; {TOKEN_WHERE}"
    if token is None:
        return f"{head} and none was found; {TOKEN_WHERE}"
    return f"{head}: set RAY_AUTH_MODE=token (a token is in {where}); {TOKEN_WHERE}"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address`, or start a local Ray; give our job's workers the environment
    they need (WORKER_ENV, emulator/token variables, RCIG_* knobs)."""
    import ray

    from orchestrator.sweep import _FORWARD_PREFIXES, WORKER_ENV

    # Intermediate reports carry training metrics; eval/mean arrives with the last one.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_PREFIXES)}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": {**env, **WORKER_ENV}}}
    node_ip = os.environ.get(NODE_IP_ENV)
    client = bool(address) and address.startswith("ray://")
    if node_ip and not client:
        kwargs["_node_ip_address"] = node_ip
    if address and not client and address != "auto":
        problem = token_problem(address)
        if problem:
            raise _sweep_error(problem)
    try:
        # Without an address: RAY_ADDRESS when set (a cluster named on purpose), else a
        # new local Ray, never one named by a leftover /tmp/ray/ray_current_cluster (a
        # dead one there made ray.init retry its GCS for ever).
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, **kwargs)
    except Exception as e:  # noqa: BLE001 - ConnectionError, AuthenticationError (a RayError), ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if type(e).__name__ == "AuthenticationError":
            first = f"Ray auth token missing or rejected; {TOKEN_WHERE}"
        elif not isinstance(e, (ConnectionError, RuntimeError, ValueError)):
            raise
        raise _sweep_error(f"cannot connect to the Ray cluster at {address or 'local'}: {first}") from None


# ---- storage ------------------------------------------------------------------------------


def check_storage(sweep_uri: str, address: str | None, shared_storage: bool = False) -> None:
    """A sweep on a cluster (`--address`) must keep its folder where every node reads and
    writes it: `gs://`, or a local path the user declares shared (`--shared-storage`)."""
    from rcig import storage

    if not address or shared_storage or storage.is_remote(sweep_uri):
        return
    raise _sweep_error(
        f"--address {address} with local storage {sweep_uri}: each node would keep its own "
        f"records and checkpoints there (status sees none; a trial moved to another node "
        f"restarts from scratch); use --storage gs://BUCKET/sweeps, or --shared-storage if "
        f"{sweep_uri} is a mount every node shares (NFS)")


# ---- what the cluster offers --------------------------------------------------------------


def covers(resources: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    """Whether a node with `resources` can hold one `bundle`."""
    return all(float(resources.get(k, 0)) >= float(v) for k, v in bundle.items() if v)


def shortfall(bundle: Mapping[str, float], types: Mapping[str, Mapping[str, float]]) -> str:
    """Why no type in `types` holds `bundle`, resource by resource (one phrase)."""
    if not types:
        return "the cluster lists no node types"
    parts = []
    for key, want in bundle.items():
        have = max(float(res.get(key, 0)) for res in types.values())
        if have >= float(want):
            continue
        if key.startswith("accelerator_type:"):
            known = sorted({k.split(":", 1)[1] for res in types.values() for k in res
                            if k.startswith("accelerator_type:")})
            parts.append(f"no node type has accelerator type {key.split(':', 1)[1]} "
                         f"(known: {', '.join(known) or 'none'})")
        elif have == 0:
            parts.append(f"no node type has {key}")
        else:
            parts.append(f"{key} {float(want):g} > at most {have:g} on any node type")
    if not parts:  # each resource fits somewhere, but never all on one type
        return "no single node type has all of them"
    return "; ".join(parts)


@dataclass
class ClusterOffers:
    """What a cluster can give one trial (see `cluster_offers`)."""

    nodes: dict[str, dict[str, float]] = field(default_factory=dict)       # live nodes
    node_types: dict[str, dict[str, float]] = field(default_factory=dict)  # types seen live
    declared: dict[str, dict[str, float]] = field(default_factory=dict)    # launcher config's types
    autoscaler: str | None = None      # "v2", "v1" or None (a fixed cluster, or local Ray)
    can_add: bool | None = None        # the autoscaler's answer for the bundle; None: not asked
    notes: list[str] = field(default_factory=list)

    def live_fit(self, bundle: Mapping[str, float]) -> list[str]:
        return [name for name, res in self.nodes.items() if covers(res, bundle)]

    def live_hosts_fit(self, bundles: Sequence[Mapping[str, float]]) -> bool:
        """Whether distinct live nodes hold all of a trial's host bundles (one each)."""
        return hosts_fit(list(self.nodes.values()), bundles)


def hosts_fit(nodes: Sequence[Mapping[str, float]], bundles: Sequence[Mapping[str, float]]) -> bool:
    """Whether `bundles` fit on distinct `nodes`, one bundle per node (STRICT_SPREAD).
    A trial's bundles are one per host, the first possibly with more (a slice head):
    matched greedily from the most demanding, which is exact for such lists.

    Example:
        >>> hosts_fit([{"CPU": 2}, {"CPU": 2}], [{"CPU": 2}, {"CPU": 2}])
        True
        >>> hosts_fit([{"CPU": 4}], [{"CPU": 2}, {"CPU": 2}])
        False
    """
    free = list(range(len(nodes)))
    for b in sorted(bundles, key=lambda b: -len(b)):
        fits = [i for i in free if covers(nodes[i], b)]
        if not fits:
            return False
        # take the node that holds the fewest of the remaining bundles' kinds
        free.remove(min(fits, key=lambda i: len(nodes[i])))
    return True


def _visible(res: Mapping[str, float]) -> dict[str, float]:
    return {k: (int(v) if float(v).is_integer() else v) for k, v in res.items()
            if not k.startswith(_HIDDEN)}


def _same_bundle(request, bundle: Mapping[str, float]) -> bool:
    return dict(request.resources_bundle) == {k: float(v) for k, v in bundle.items()}


def read_offers(gcs_address: str, bundle: Mapping[str, float] | None, timeout_s: float,
                bundles: Sequence[Mapping[str, float]] | None = None) -> dict:
    """Read the cluster at `gcs_address` (runs in the driver, or on the cluster under Ray
    Client); returns `ClusterOffers` fields as plain data. `bundles`: a multi-host trial's
    bundles (one per host; the autoscaler is asked for all of them at once)."""
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import request_cluster_resources
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply, NodeStatus

    gcs = GcsClient(address=gcs_address)

    def status() -> GetClusterStatusReply:  # what ray.autoscaler.v2.sdk.get_cluster_status parses
        reply = GetClusterStatusReply()
        reply.ParseFromString(gcs.get_cluster_status(timeout_s=10))
        return reply

    out: dict[str, Any] = {"nodes": {}, "node_types": {}, "declared": {}, "autoscaler": None,
                           "can_add": None, "notes": []}
    for n in status().cluster_resource_state.node_states:
        if n.status == NodeStatus.Value("DEAD"):
            continue
        kind = n.ray_node_type_name
        out["nodes"][f"node {n.node_id.hex()[:8]}" + (f" ({kind})" if kind else "")] = dict(n.total_resources)
        if kind:
            out["node_types"][kind] = dict(n.total_resources)
    boot = os.path.expanduser("~/ray_bootstrap_config.yaml")  # `ray up` writes it on the head
    if os.path.exists(boot):
        from orchestrator.cluster import launchable_node_types, load_cluster_config

        try:
            out["declared"] = launchable_node_types(load_cluster_config(boot))
        except Exception:  # noqa: BLE001 - only used to list node types in a message
            pass
    if is_autoscaler_v2(fetch_from_server=True, gcs_client=gcs):
        out["autoscaler"] = "v2"
    else:  # autoscaler v1 publishes a status; a head without autoscaling config reports "legacy"
        import json

        raw = gcs.internal_kv_get(b"__autoscaling_status", namespace=None)
        try:
            report = json.loads(raw or b"{}").get("autoscaler_report") or {}
        except ValueError:
            report = {}
        if report and not report.get("legacy"):
            out["autoscaler"] = "v1"
    asked = [dict(b) for b in (bundles or ([bundle] if bundle else []))]
    if not asked or out["autoscaler"] != "v2" or hosts_fit(list(out["nodes"].values()), asked):
        return out

    request_cluster_resources(gcs_address, [{"resources": b} for b in asked])
    try:
        seen_at = None
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            reply = status()
            state, scaler = reply.cluster_resource_state, reply.autoscaling_state
            if seen_at is None and any(_same_bundle(c.request, b) for b in asked
                                       for con in state.cluster_resource_constraints
                                       for c in con.resource_requests):
                seen_at = state.cluster_resource_state_version
            if seen_at is not None and scaler.last_seen_cluster_resource_state_version >= seen_at:
                out["can_add"] = not any(_same_bundle(c.request, b) for b in asked
                                         for con in scaler.infeasible_cluster_resource_constraints
                                         for c in con.resource_requests)
                if out["can_add"]:
                    launching = sorted({p.ray_node_type_name for p in scaler.pending_instance_requests}
                                       | {p.ray_node_type_name for p in scaler.pending_instances})
                    if launching:
                        out["notes"].append(f"the autoscaler is adding: {', '.join(launching)}")
                return out
            time.sleep(0.25)
        out["notes"].append(f"the autoscaler did not answer within {timeout_s:g} s "
                            f"({PREFLIGHT_TIMEOUT_ENV}); node types not checked")
        return out
    finally:
        request_cluster_resources(gcs_address, [])  # withdraw: Tune's own demand takes over


def cluster_offers(bundle: Mapping[str, float] | None = None, timeout_s: float | None = None,
                   bundles: Sequence[Mapping[str, float]] | None = None) -> ClusterOffers:
    """What the connected cluster can give a trial asking `bundle` (or, on several hosts,
    `bundles`: one per host) (see the module docstring)."""
    bundles = [dict(b) for b in bundles] if bundles else None
    import ray

    timeout = float(os.environ.get(PREFLIGHT_TIMEOUT_ENV, "60")) if timeout_s is None else timeout_s
    bundle = dict(bundle) if bundle else None
    if ray.util.client.ray.is_connected():  # Ray Client: read it on the cluster
        @ray.remote(num_cpus=0)
        def remote_read(b, t, bs):
            import ray as r

            return read_offers(r.get_runtime_context().gcs_address, b, t, bs)

        data = ray.get(remote_read.remote(bundle, timeout, bundles), timeout=timeout + 60)
    else:
        data = read_offers(ray.get_runtime_context().gcs_address, bundle, timeout, bundles)
    return ClusterOffers(**data)


def preflight(spec, address: str | None) -> list[str]:
    """Refuse (SweepError) a spec whose trial bundle no live node holds and no node the
    autoscaler can add would hold; returns notes for the user otherwise."""
    bundle = spec.ray_resources()
    bundles = spec.ray_bundles()
    offers = cluster_offers(bundle, bundles=bundles if len(bundles) > 1 else None)
    if not address:  # the Ray we started here: its monitor only watches, never adds nodes
        offers.autoscaler, offers.can_add = None, None
    if offers.live_hosts_fit(bundles) or offers.can_add:
        return offers.notes
    if offers.autoscaler and offers.can_add is None:
        # An autoscaler we could not ask (v1, or no answer in time): the launcher config's
        # node types decide if this is its head node, else the sweep is not blocked.
        if not offers.declared:
            return offers.notes + [f"could not check {bundle} against the autoscaler's node types"]
        if any(covers(r, bundle) for r in offers.declared.values()):
            return offers.notes
    if len(bundles) > 1 and offers.live_fit(bundles[-1]) and not offers.autoscaler:
        raise _sweep_error(_too_few_hosts(spec, address, bundles, offers))
    where = f"the cluster at {address}" if address else "the cluster at local (this machine's Ray, no --address)"
    show = lambda types: "; ".join(f"{n} {_visible(r)}" for n, r in sorted(types.items())) or "none"  # noqa: E731
    if offers.autoscaler:
        why = ("its autoscaler reports that no node type it can add holds it" if offers.can_add is False
               else "no node type of its launcher config holds it")
        if offers.declared:
            why += f" ({shortfall(bundle, offers.declared)}); node types: {show(offers.declared)}"
        else:
            why += (f"; node types seen so far (the autoscaler does not publish its list): "
                    f"{show(offers.node_types)}")
    else:
        why = f"{shortfall(bundle, offers.nodes)}; nodes (no autoscaler): {show(offers.nodes)}"
    raise _sweep_error(f"{spec.source}: resources: no node of {where} offers {bundle} per trial: "
                       f"{why}; lower resources or use a cluster with such a node type")


def _too_few_hosts(spec, address: str | None, bundles: list[dict], offers: ClusterOffers) -> str:
    """One line: a multi-host trial needs more nodes (one per host) than the cluster has."""
    where = f"the cluster at {address}" if address else "the cluster at local (this machine's Ray, no --address)"
    fit = offers.live_fit(bundles[-1])
    head = "" if bundles[0] == bundles[-1] else f" (the first also {_visible(bundles[0])})"
    return (f"{spec.source}: resources.hosts: a trial spans {len(bundles)} hosts, one node each "
            f"holding {_visible(bundles[-1])}{head}, but only {len(fit)} node(s) of {where} "
            f"hold one (no autoscaler to add more): {', '.join(fit)}; lower resources.hosts or add nodes")
