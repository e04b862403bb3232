"""Cluster definitions (infra/), `rcig cluster`, and the trial device environment.

No test reaches a cloud: launcher YAMLs go through Ray's own validator, manifests are
parsed and checked for what KubeRay and the README need, and `rcig cluster` is run with a
stand-in `ray` executable on PATH that records whether (and how) it was called.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from orchestrator import cluster
from orchestrator.cluster import ClusterConfigError
from orchestrator.devices import (
    clean_stale_libtpu_lockfile,
    configure_trial_devices,
    ray_bundle,
    tpu_slice,
    trial_bundles,
    trial_device_env,
)
from orchestrator.kuberay import raycluster_node_types
from orchestrator.preflight import covers

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
LAUNCHERS = {"tpu": INFRA / "gcp-tpu.yaml", "gpu": INFRA / "gcp-gpu.yaml"}
GKE = INFRA / "gke"
SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))


def _gke_docs() -> list[dict]:
    docs = []
    for path in sorted(GKE.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str) -> dict:
    found = [d for d in _gke_docs() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in infra/gke, found {len(found)}"
    return found[0]


def _ready_copy(src: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of a shipped launcher YAML with the project placeholder filled in."""
    config = yaml.safe_load(src.read_text().replace("YOUR_PROJECT_ID", "rcig-test-project"))
    if edit:
        edit(config)
    out = tmp_path / src.name
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@pytest.fixture
def fake_ray(tmp_path, monkeypatch):
    """A `ray` executable first on PATH that only records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "ray-calls.txt"
    script = bin_dir / "ray"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


# ---- launcher YAMLs ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(LAUNCHERS))
def test_launcher_yaml_passes_rays_validator(kind):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHERS[kind].read_text())
    validate_config(prepare_config(config))  # Ray's own schema + checks; raises on error
    check = cluster.check_cluster(LAUNCHERS[kind], require_ready=False)  # + ours, + shipped specs
    assert check.prepared["head_node_type"] == "ray_head"


def test_tpu_launcher_has_spot_tpu_workers_and_installs_project():
    config = yaml.safe_load(LAUNCHERS["tpu"].read_text())
    types = config["available_node_types"]
    assert types["ray_head"]["resources"] == {"CPU": 0}
    assert "machineType" in types["ray_head"]["node_config"]
    expect = {"tpu_v4_8": ("v4-8", 4, "TPU-V4"), "tpu_v5e_8": ("v5litepod-8", 8, "TPU-V5LITEPOD")}
    for name, (acc, chips, acc_type) in expect.items():
        t = types[name]
        assert t["node_config"]["acceleratorType"] == acc
        assert t["node_config"]["schedulingConfig"] == {"preemptible": True}
        assert t["min_workers"] == 0
        assert t["resources"]["TPU"] == chips and t["resources"][f"accelerator_type:{acc_type}"] == 1
        steps = " ; ".join(t["worker_setup_commands"])
        assert '"jax[tpu]"' in steps and "-e ~/rcig-sweep" in steps
        assert t["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert config["file_mounts"] == {"~/rcig-sweep": "."}


def test_gpu_launcher_has_spot_a100_and_h100_workers():
    config = yaml.safe_load(LAUNCHERS["gpu"].read_text())
    types = config["available_node_types"]
    for name, acc_type in (("gpu_a100_x1", "A100"), ("gpu_h100_x8", "H100")):
        t = types[name]
        assert t["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
        assert t["resources"]["GPU"] >= 1 and t["resources"][f"accelerator_type:{acc_type}"] == 1
        assert any('"jax[cuda12]"' in c for c in t["worker_setup_commands"])


@pytest.mark.parametrize(
    "launcher, edit, expected",
    [
        # Ray's own schema
        ("gpu", lambda c: c["available_node_types"]["cpu_spot"].update(bogus_field=1), "bogus_field"),
        ("gpu", lambda c: c["available_node_types"]["cpu_spot"]["resources"].update(CPU="sixteen"),
         "available_node_types.cpu_spot.resources.CPU"),
        ("gpu", lambda c: c.update(head_node_type="nope"), "head_node_type"),
        # our checks, for what Ray's schema cannot catch
        ("tpu", lambda c: c["available_node_types"]["tpu_v4_8"]["resources"].update(TPU=8),
         "tpu_v4_8.resources.TPU: declares 8 TPU chips but acceleratorType v4-8 has 4"),
        ("tpu", lambda c: c["available_node_types"]["tpu_v4_8"]["resources"].update({"accelerator_type:TPU-V5P": 1}),
         "'accelerator_type:TPU-V5P' does not match acceleratorType v4-8"),
        ("tpu", lambda c: c["available_node_types"]["tpu_v4_8"].update(worker_setup_commands=["pip install x"]),
         "tpu_v4_8.worker_setup_commands: replaces the global setup_commands"),
        ("tpu", lambda c: c.update(head_node_type="tpu_v4_8"), "head node cannot be a TPU VM"),
    ],
    ids=["ray-bogus-field", "ray-cpu-type", "ray-head-type",
         "tpu-chips", "tpu-accelerator-type", "tpu-setup-commands", "tpu-head"],
)
def test_check_cluster_rejects_bad_fields(tmp_path, launcher, edit, expected):
    path = _ready_copy(LAUNCHERS[launcher], tmp_path, edit)
    with pytest.raises(ClusterConfigError, match=re.escape(expected)):
        cluster.check_cluster(path)


def test_gpu_vm_without_terminate_on_maintenance_is_rejected(tmp_path):
    def edit(c):
        c["available_node_types"]["gpu_a100_x1"]["node_config"]["scheduling"].pop("onHostMaintenance")

    with pytest.raises(ClusterConfigError, match="GPU VMs need onHostMaintenance: TERMINATE"):
        cluster.check_cluster(_ready_copy(LAUNCHERS["gpu"], tmp_path, edit))


def test_node_types_satisfying_matches_bundles():
    config = yaml.safe_load(LAUNCHERS["tpu"].read_text())
    tpu_v4 = cluster.bundle_from_resources({"cpu": 8, "tpu": 4, "accelerator_type": "TPU-V4"})
    # a one-host v4 trial fits a v4-8, and also one host of a v4-16 slice
    assert sorted(cluster.node_types_satisfying(config, tpu_v4)) == ["tpu_v4_16", "tpu_v4_8"]
    # a v4-16 trial: its first host asks the slice head, which only the slice type offers
    assert cluster.node_types_satisfying(config, cluster.bundle_from_resources({"cpu": 8, "tpu": "v4-16"})) == ["tpu_v4_16"]
    # v5e is declared but disabled (max_workers: 0) in the v4 zone: never launchable here
    v5e = cluster.bundle_from_resources({"tpu": 8, "accelerator_type": "TPU-V5LITEPOD"})
    assert cluster.node_types_satisfying(config, v5e) == []
    assert cluster.node_types_satisfying(config, {"TPU": 16}) == []
    assert "cpu_spot" in cluster.node_types_satisfying(config, cluster.bundle_from_resources({"cpu": 2}))


def test_spec_that_cannot_fit_is_reported(tmp_path):
    spec = tmp_path / "big.yaml"
    spec.write_text("name: big\nresources: {cpu: 4, gpu: 16, accelerator_type: H100}\n")
    with pytest.raises(ClusterConfigError, match="no launchable node type offers .*big.yaml"):
        cluster.check_cluster(_ready_copy(LAUNCHERS["gpu"], tmp_path), [spec])
    spec.write_text("name: ok\nresources: {cpu: 4, gpu: 1, accelerator_type: A100}\n")
    cluster.check_cluster(_ready_copy(LAUNCHERS["gpu"], tmp_path), [spec])


def test_shipped_specs_fit_some_node_type_of_each_cluster():
    assert SPECS, f"no sweep specs found by {ROOT / 'sweeps'}/*.yaml"
    clusters = {name: yaml.safe_load(p.read_text()) for name, p in LAUNCHERS.items()}
    clusters["gke"] = raycluster_node_types(_one("RayCluster"))
    for spec in SPECS:
        bundle = cluster.spec_bundle(spec)
        wanted = {k for k in ("TPU", "GPU") if bundle.get(k)}
        targets = ["gke"] + [n for n in LAUNCHERS if not wanted or n.upper() in wanted]
        assert len(targets) > 1, f"{spec.name} asks {bundle}: no launcher config of that kind"
        for name in targets:
            fits = cluster.node_types_satisfying(clusters[name], bundle)
            assert fits, f"{spec.name} asks {bundle} per trial; no node type of {name} offers it"


def test_tpu_launcher_has_a_spot_multi_host_slice_type():
    """The v4-16 node type is a 2-host slice whose hosts each hold one host bundle of a
    `tpu: v4-16` trial (the first one with the slice head), as Ray's TPU support names them."""
    config = yaml.safe_load(LAUNCHERS["tpu"].read_text())
    t = config["available_node_types"]["tpu_v4_16"]
    sl = tpu_slice(t["node_config"]["acceleratorType"])
    assert (sl.name, sl.hosts, sl.chips_per_host) == ("v4-16", 2, 4)
    assert t["node_config"]["schedulingConfig"] == {"preemptible": True} and t["min_workers"] == 0
    assert t["resources"]["TPU"] == sl.chips_per_host and t["resources"][sl.head_resource] == 1
    assert t["resources"][f"accelerator_type:{sl.accelerator_type}"] == 1
    bundles = trial_bundles({"cpu": 8, "tpu": "v4-16"})
    assert len(bundles) == sl.hosts and bundles[0][sl.head_resource] == 1
    assert cluster.node_types_satisfying(config, bundles[0]) == ["tpu_v4_16"]
    assert all("tpu_v4_16" in cluster.node_types_satisfying(config, b) for b in bundles[1:])
    steps = " ; ".join(t["worker_setup_commands"])
    assert '"jax[tpu]"' in steps and "-e ~/rcig-sweep" in steps


# ---- KubeRay manifests --------------------------------------------------------------------


def test_gke_manifests_parse_and_have_kuberay_fields():
    docs = _gke_docs()
    assert {d["kind"] for d in docs} >= {"RayCluster", "RayJob", "ServiceAccount"}
    rc, job = _one("RayCluster"), _one("RayJob")
    for doc in (rc, job):
        assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    head = rc["spec"]["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"]
    groups = rc["spec"]["workerGroupSpecs"]
    for g in groups:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in g, f"worker group {g.get('groupName')} lacks {key}"
        assert g["minReplicas"] == 0 <= g["replicas"] <= g["maxReplicas"]
        assert g["template"]["spec"]["containers"][0]["image"]
    assert job["spec"]["entrypoint"].startswith("rcig sweep launch ")
    assert "--storage gs://" in job["spec"]["entrypoint"]
    assert job["spec"].get("rayClusterSpec") or job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]


def test_rayjob_runs_a_shipped_spec():
    assert SPECS, f"no sweep specs found by {ROOT / 'sweeps'}/*.yaml"
    entry = _one("RayJob")["spec"]["entrypoint"]
    spec = re.search(r"/home/ray/rcig-sweep/(sweeps/\S+\.yaml)", entry).group(1)
    assert (ROOT / spec).is_file(), f"rayjob.yaml runs {spec}, which is not in the repository"


def _readme_gke_groups() -> dict[str, tuple[str, dict[str, str]]]:
    text = (INFRA / "README.md").read_text()
    table = text.split("<!-- gke-worker-groups:begin -->")[1].split("<!-- gke-worker-groups:end -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        group, resource, selectors = [c.strip() for c in line.strip("|").split("|")]
        rows[group] = (resource, dict(s.strip().split("=", 1) for s in selectors.split(",")))
    return rows


def test_gke_groups_ask_what_the_readme_promises():
    promised = _readme_gke_groups()
    groups = {g["groupName"]: g for g in _one("RayCluster")["spec"]["workerGroupSpecs"]}
    assert set(promised) == set(groups)
    assert {"tpu-v4-2x2x1", "tpu-v5e-2x4", "gpu-a100", "gpu-h100"} <= set(groups)
    for name, (resource, selectors) in promised.items():
        pod = groups[name]["template"]["spec"]
        container = pod["containers"][0]["resources"]
        assert pod["nodeSelector"] == selectors, name
        if resource != "-":
            key, count = [s.strip() for s in resource.split(":")]
            assert container["requests"][key] == container["limits"][key] == count, name
        tolerated = {t["key"] for t in pod.get("tolerations", [])}
        assert "cloud.google.com/gke-spot" in tolerated, name
        if "google.com/tpu" in resource:
            assert "google.com/tpu" in tolerated
        assert pod["serviceAccountName"] == "rcig-ray"


def test_gke_multi_host_tpu_group_is_one_slice_per_replica():
    """numOfHosts pods of one replica form one slice: hosts x chips per pod = the chips of
    the topology, and each pod holds one host bundle of a `tpu: v4-16` trial (KubeRay's
    autoscaler adds the slice head resource to worker 0 of each replica)."""
    groups = {g["groupName"]: g for g in _one("RayCluster")["spec"]["workerGroupSpecs"]}
    multi = [g for g in groups.values() if g.get("numOfHosts", 1) > 1]
    assert [g["groupName"] for g in multi] == ["tpu-v4-2x2x2"]
    g = multi[0]
    pod = g["template"]["spec"]
    topology = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    chips = 1
    for d in topology.split("x"):
        chips *= int(d)
    per_pod = int(pod["containers"][0]["resources"]["limits"]["google.com/tpu"])
    sl = tpu_slice("v4-16")
    assert (g["numOfHosts"], per_pod, chips) == (sl.hosts, sl.chips_per_host, sl.chips)
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v4-podslice"
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert g["minReplicas"] == g["replicas"] == 0
    offered = raycluster_node_types(_one("RayCluster"))["available_node_types"][g["groupName"]]["resources"]
    host = {k: v for k, v in ray_bundle({"cpu": 8, "tpu": "v4-16"}).items() if k != sl.head_resource}
    assert covers(offered, host), (offered, host)


def test_manifests_reference_no_key_files_or_secrets():
    sa = _one("ServiceAccount")
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    for path in [*GKE.iterdir(), *LAUNCHERS.values()]:
        text = path.read_text()
        for banned in ("GOOGLE_APPLICATION_CREDENTIALS", "key.json", "secretName", "kind: Secret", "private_key"):
            assert banned not in text, f"{path.name} mentions {banned}"


def test_kuberay_runs_autoscaler_v2_from_zero_and_never_reuses_pods():
    """What the sweep preflight relies on: autoscaler v2 (it reports infeasible requests),
    every worker group at zero, pods not restarted in place (a new pod is a new Ray node)."""
    rc = _one("RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in head["containers"][0].get("env", [])}
    assert env.get("RAY_enable_autoscaler_v2") == "1"
    pods = [head] + [g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]]
    assert all(p.get("restartPolicy") == "Never" for p in pods)
    assert all(g["replicas"] == g["minReplicas"] == 0 for g in rc["spec"]["workerGroupSpecs"])
    assert rc["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] > 0


@pytest.mark.parametrize("kind", sorted(LAUNCHERS))
def test_launcher_workers_scale_from_zero_on_spot_and_reach_the_bucket(kind):
    config = yaml.safe_load(LAUNCHERS[kind].read_text())
    assert 0 < config["idle_timeout_minutes"] <= 30
    head = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        if name == head:
            assert node_type["resources"].get("CPU") == 0  # trials never land on the head
            continue
        node = node_type["node_config"]
        assert node_type.get("min_workers", 0) == 0, name
        spot = (node.get("scheduling") or {}).get("provisioningModel") == "SPOT" \
            or (node.get("schedulingConfig") or {}).get("preemptible") is True
        assert spot, f"{name}: not Spot/preemptible"
        accounts = node.get("serviceAccounts") or [node.get("serviceAccount")]
        scopes = [sc for a in accounts for sc in (a.get("scopes") or a.get("scope") or [])]
        assert "https://www.googleapis.com/auth/cloud-platform" in scopes, name
        assert all(a["email"].startswith("rcig-sweep@") for a in accounts), name
    assert cluster.sweep_root(config) == "gs://YOUR_PROJECT_ID-sweeps/sweeps"


def test_cluster_up_prints_the_address_and_the_exact_launch_line(tmp_path):
    ready = yaml.safe_load(_ready_copy(LAUNCHERS["gpu"], tmp_path).read_text())
    text = cluster.next_steps("infra/gcp-gpu.yaml", ready)
    assert "Ray address: ray://127.0.0.1:10001" in text
    line = next(ln.strip() for ln in text.splitlines() if "rcig sweep launch" in ln)
    assert re.fullmatch(r"rcig sweep launch sweeps/\S+\.yaml --address ray://127\.0\.0\.1:10001 "
                        r"--storage gs://rcig-test-project-sweeps/sweeps", line), line


# ---- rcig cluster -------------------------------------------------------------------------


def test_cluster_up_on_invalid_config_exits_with_reason_and_never_runs_ray(tmp_path, fake_ray):
    bad = _ready_copy(LAUNCHERS["tpu"], tmp_path, lambda c: c["provider"].update(type=42))
    for args in (["up", str(bad), "--yes"], ["status", str(bad)], ["down", str(bad), "--yes"]):
        result = CliRunner().invoke(app, ["cluster", *args])
        assert result.exit_code == 1, args
        assert "provider.type" in result.output and str(bad) in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    missing = CliRunner().invoke(app, ["cluster", "up", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "no such cluster config file" in missing.output
    assert not fake_ray.exists(), "ray was called for an invalid config"


def test_next_steps_name_the_tunnel_and_the_sweep_command():
    config = yaml.safe_load(LAUNCHERS["gpu"].read_text())
    text = cluster.next_steps("infra/gcp-gpu.yaml", config)
    assert "ray attach infra/gcp-gpu.yaml -p 10001" in text
    assert re.search(r"rcig sweep launch sweeps/\S+\.yaml --address ray://127.0.0.1:10001 --storage gs://", text)


def test_cluster_up_on_shipped_template_asks_for_the_project(fake_ray):
    result = CliRunner().invoke(app, ["cluster", "up", str(LAUNCHERS["gpu"])])
    assert result.exit_code == 1
    assert "provider.project_id" in result.output and "YOUR_PROJECT_ID" in result.output
    assert not fake_ray.exists()


def test_cluster_up_dry_run_prints_the_ray_command(tmp_path, fake_ray):
    ok = _ready_copy(LAUNCHERS["tpu"], tmp_path)
    result = CliRunner().invoke(app, ["cluster", "up", str(ok), "--yes", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert re.search(rf"would run: \S*ray up {re.escape(str(ok))} --yes", result.output)
    for action, expected in (("down", "ray down"), ("status", "ray exec")):
        result = CliRunner().invoke(app, ["cluster", action, str(ok), "--dry-run"])
        assert result.exit_code == 0 and expected in result.output
    assert not fake_ray.exists()


def test_cluster_up_runs_ray_up_only_when_launchable(tmp_path, fake_ray):
    import importlib.util

    ok = _ready_copy(LAUNCHERS["gpu"], tmp_path)
    result = CliRunner().invoke(app, ["cluster", "up", str(ok), "--yes"])
    if importlib.util.find_spec("googleapiclient") is None:  # ray up on GCP could not work here
        assert result.exit_code == 1 and "google-api-python-client" in result.output
        assert not fake_ray.exists()
    else:
        assert result.exit_code == 0, result.output
        assert fake_ray.read_text().split() == ["up", str(ok), "--yes"]
        assert "rcig sweep launch" in result.output


# ---- trial devices ------------------------------------------------------------------------


def test_cpu_trial_gets_one_xla_device_per_cpu():
    env = trial_device_env({"cpu": 3}, {"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=4"})
    assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--foo --xla_force_host_platform_device_count=3"}
    assert trial_device_env({"CPU": 2}, {})["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert trial_device_env({}, {})["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"


def test_gpu_trial_turns_preallocation_off_and_keeps_user_choices():
    env = trial_device_env({"cpu": 8, "gpu": 1, "accelerator_type": "A100"}, {"CUDA_VISIBLE_DEVICES": "3"})
    assert env == {
        "JAX_PLATFORMS": "cuda,cpu",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
    }
    assert trial_device_env({"gpu": 0.5}, {})["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.45"
    mine = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3", "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    env = trial_device_env({"GPU": 2}, mine)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.3" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


def test_multi_host_trial_env_is_per_host():
    """Each host's process of a 2-host trial sees its own 2 CPU devices (4 in the mesh)."""
    env = trial_device_env({"cpu": 2, "hosts": 2}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert trial_device_env({"cpu": 8, "tpu": "v4-16"}, {}) == {"JAX_PLATFORMS": "tpu,cpu"}


def test_tpu_trial_leaves_ray_chip_assignment_alone():
    environ = {"TPU_VISIBLE_CHIPS": "0,1", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env = trial_device_env({"tpu": 2, "cpu": 8}, environ)
    assert env == {"JAX_PLATFORMS": "tpu,cpu", "XLA_FLAGS": ""}
    assert "TPU_VISIBLE_CHIPS" not in env


def test_stale_libtpu_lockfile_is_removed_but_a_held_one_is_kept(tmp_path):
    lock = tmp_path / "libtpu_lockfile"
    lock.write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"f = open({str(lock)!r}); import time; print('ok', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert clean_stale_libtpu_lockfile(lock) is False and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    environ: dict[str, str] = {}
    configure_trial_devices({"tpu": 4}, environ, lockfile=lock)
    assert not lock.exists() and environ["JAX_PLATFORMS"] == "tpu,cpu"


def test_configured_cpu_trial_sees_that_many_jax_devices():
    code = (
        "import os; from orchestrator.devices import configure_trial_devices, describe_local_devices;"
        "configure_trial_devices({'cpu': 3});"
        "d = describe_local_devices(); print(d['backend'], d['local_device_count'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["cpu", "3"]
    assert time.time() - start < 60
