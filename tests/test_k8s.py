"""The Kubernetes manifests (k8s/), checked offline: there is no cluster and no Docker here.

Each overlay is built the way `kubectl apply -k` builds it (`kubectl kustomize`, a subprocess: those tests are e2e),
and the built output is checked against KubeRay's v1 API (tests/kuberay_schema.py), Kubernetes' own schemas
(kubernetes-validate), Ray Serve's config schema and `ServeArgs`, and against what `build_app` would reserve
(`deployment_plan`): a unit fits a GPU pod, the Ingress replicas fit the pods that advertise what they ask for, the
pods outlive Serve's graceful shutdown, the checkpoint is wherever a replica can run. The Serve configs in deploy/
and the strict schema's refusals are checked without kubectl.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pydantic
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from ray._private import ray_constants

from cluster.serve.app import DeploymentPlan, decide, deployment_plan
from cluster.serve.args import ServeArgs
from cluster.serve.live import INGRESS_SETTINGS, ROUTER_SETTINGS, reconfigured
from tests.kuberay_schema import KUBERAY_VERSION, ray_start_resources, validate_rayservice
from tests.network_policy import Pod, admits
from tests.pod_security import restricted_violations
from tests.tools import kustomize

ROOT = Path(__file__).parents[1]
K8S_VERSION = "1.32.0"  # the Kubernetes release whose schemas the core kinds are checked against
OVERLAYS = {  # overlay -> the Serve config its RayService embeds
    "single-node": ROOT / "deploy" / "serve_config.yaml",
    "autoscaling": ROOT / "deploy" / "serve_config_autoscaling.yaml",
    "data-parallel": ROOT / "deploy" / "serve_config_data_parallel.yaml",
}
ONE_NODE = {"single-node", "data-parallel"}  # one fixed unit on one node: no autoscaler, no api pods, no Redis
LEDGER_ENV = "MOE_CLUSTER_DB_PASSWORD"
DRAIN_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"  # Ray's own drain after SIGTERM (`ray start --block`)
# Allowances, not measurements: the seconds the manifests must leave for the drain request itself and for Ray's
# stop after SIGTERM (beyond the drain deadline), and for Serve's control loop to act on the drain before it stops
# the node's replicas at deadline - graceful_shutdown_timeout_s.
DRAIN_CALL_S, RAY_STOP_S, SERVE_NOTICE_S = 10, 10, 10

_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("16Gi", "500m", "8") as a number."""
    match = _QUANTITY.match(str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match[1]) * _FACTORS[match[2]]


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def built(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    """(overlay, its documents) as `kubectl kustomize k8s/overlays/<overlay>` prints them."""
    return request.param, kustomize(ROOT / "k8s" / "overlays" / request.param)


@pytest.fixture(scope="module")
def storage() -> list[dict[str, Any]]:
    """k8s/storage's documents: the claims every overlay mounts and none of them holds."""
    return kustomize(ROOT / "k8s" / "storage")


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def serve_args(config: dict[str, Any]) -> ServeArgs:
    (app,) = config["applications"]
    return ServeArgs.model_validate(app["args"])


def embedded_args(rayservice: dict[str, Any]) -> ServeArgs:
    return serve_args(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))


def plan_of(args: ServeArgs) -> DeploymentPlan:
    """What build_app would ask Serve for (the configs give device and ingress_replicas, so nothing is guessed)."""
    return deployment_plan(decide(args))


def served_plan(config: dict[str, Any]) -> DeploymentPlan:
    """What Serve runs for a config: build_app's plan with the config's `deployments:` options over it, as Serve
    applies them (each option given replaces the code's; `num_replicas: auto` leaves the count to autoscaling)."""
    (app,) = config["applications"]
    plan = plan_of(ServeArgs.model_validate(app["args"]))
    options = {"AttentionRouter": dict(plan.router), "Ingress": dict(plan.ingress)}
    for override in app.get("deployments", []):
        target = options[override["name"]]  # a KeyError: a deployment the app does not have
        for key, value in override.items():
            if key == "num_replicas" and value == "auto":
                target.pop("num_replicas", None)
            elif key != "name":
                target[key] = value
    return DeploymentPlan(options["AttentionRouter"], options["Ingress"])


def served_plan_of(rayservice: dict[str, Any]) -> DeploymentPlan:
    return served_plan(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))


def groups(rayservice: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) of the head and every worker group."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]


def workers(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def limits(group: dict[str, Any]) -> dict[str, Any]:
    return ray_container(group)["resources"]["limits"]


def group_gpus(group: dict[str, Any]) -> int:
    return int(group["rayStartParams"]["num-gpus"])


def gpu_workers(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in workers(rayservice) if group_gpus(g) > 0]


def ingress_hosts(rayservice: dict[str, Any]) -> set[str]:
    """The groups whose pods may run an Ingress replica: those advertising its custom resource, or every worker
    group when it asks for none (the head runs no replica: num-cpus 0)."""
    resource = embedded_args(rayservice).ingress_resource
    return {g["groupName"] for g in workers(rayservice)
            if (resource in ray_start_resources(g["rayStartParams"]) if resource else True)}


def env_of(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in ray_container(group).get("env", [])}


# --- The Serve configs and the strict schema: no kubectl -------------------------------------------------------------


def test_every_serve_config_is_embedded_by_one_overlay():
    assert sorted((ROOT / "deploy").glob("serve_config*.yaml")) == sorted(OVERLAYS.values())


@pytest.mark.parametrize("path", sorted(OVERLAYS.values()), ids=lambda p: p.name)
def test_serve_configs_validate_with_ray_and_serve_args(path: Path):
    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "cluster.serve.app:build_app"
    args = ServeArgs.model_validate(app["args"])
    # The head that builds the app has no GPU and no checkpoint: the device is given, never guessed there.
    assert args.device == "cuda" and args.shards == 8 and args.dtype == "bf16"
    assert PurePosixPath(args.model).is_absolute()
    plan = plan_of(args)
    assert plan.router["placement_group_strategy"] == "STRICT_PACK"
    assert plan.ingress["num_replicas"] >= 2
    # Everything live sits under `deployments:`, where editing it restarts nothing; and it validates.
    for override in app.get("deployments", []):
        settings = {"Ingress": INGRESS_SETTINGS, "AttentionRouter": ROUTER_SETTINGS}[override["name"]]
        reconfigured(args, settings, override.get("user_config"))
    served = served_plan(config)
    assert ("num_replicas" in served.router) != ("autoscaling_config" in served.router)  # Serve refuses both


@pytest.mark.parametrize("path", sorted(OVERLAYS.values()), ids=lambda p: p.name)
def test_a_live_setting_changes_no_code_version_and_an_arg_does(path: Path):
    """Serve restarts an app's replicas when its code version (import_path, runtime_env, args) changes, and only
    reconfigures them when a deployment's options change: prices, limits and autoscaling are the latter."""
    config = yaml.safe_load(path.read_text())
    (app,) = config["applications"]
    version = get_app_code_version(ServeApplicationSchema.model_validate(app))

    def changed(change) -> str:
        edited = copy.deepcopy(app)
        change(edited)
        return get_app_code_version(ServeApplicationSchema.model_validate(edited))

    router = lambda a: next(d for d in a["deployments"] if d["name"] == "AttentionRouter")  # noqa: E731
    assert changed(lambda a: router(a)["user_config"].update(max_waiting=7)) == version
    assert changed(lambda a: a["deployments"].append(
        {"name": "Ingress", "user_config": {"price_input_per_million": "9"}})) == version
    if "autoscaling_config" in router(app):  # its bounds and targets are live
        assert changed(lambda a: router(a)["autoscaling_config"].update(min_replicas=2, max_replicas=6)) == version
    else:  # turning autoscaling on is not (Serve hashes which deployments have a policy): README says so
        assert changed(lambda a: router(a).update(autoscaling_config={"max_replicas": 3})) != version
    assert changed(lambda a: a["args"].update(max_num_seqs=64)) != version
    args = ServeArgs.model_validate(app["args"])
    for name in INGRESS_SETTINGS | ROUTER_SETTINGS:  # none of them in args: editing one there would reload
        assert name not in app["args"], name
    assert args.max_units is None  # autoscaling sits in `deployments:`


def test_the_strict_schema_refuses_misspelled_and_misplaced_fields():
    base = yaml.safe_load((ROOT / "k8s" / "base" / "rayservice.yaml").read_text())
    validate_rayservice(base, K8S_VERSION)

    def refused(change, error: type[Exception]) -> None:
        doc = copy.deepcopy(base)
        change(doc)
        with pytest.raises(error):
            validate_rayservice(doc, K8S_VERSION)

    cluster = lambda d: d["spec"]["rayClusterConfig"]  # noqa: E731
    worker = lambda d: cluster(d)["workerGroupSpecs"][0]  # noqa: E731
    # Misspelled: the API server would prune it silently and KubeRay run without autoscaling.
    refused(lambda d: cluster(d).update(enableInTreeAutoscalling=cluster(d).pop("enableInTreeAutoscaling")),
            pydantic.ValidationError)
    # Misplaced: rayVersion belongs to rayClusterConfig, maxReplicas to a worker group.
    refused(lambda d: d["spec"].update(rayVersion=cluster(d).pop("rayVersion")), pydantic.ValidationError)
    refused(lambda d: cluster(d)["headGroupSpec"].update(maxReplicas=4), pydantic.ValidationError)
    # The Go types: rayStartParams is a map of strings; minReplicas <= maxReplicas.
    refused(lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}), pydantic.ValidationError)
    refused(lambda d: worker(d).update(minReplicas=3, maxReplicas=2), pydantic.ValidationError)
    # rayStartParams are `ray start` flags: a misspelled one would stop the pod's Ray from starting.
    refused(lambda d: worker(d)["rayStartParams"].update({"num-gpu": "8"}), pydantic.ValidationError)
    # Custom resources: KubeRay's quoted JSON is accepted; bare JSON splits into shell words, and Ray's autoscaler
    # takes whole amounts only.
    documented = copy.deepcopy(base)
    worker(documented)["rayStartParams"]["resources"] = '"{\\"moe_ingress\\": 1}"'
    validate_rayservice(documented, K8S_VERSION)
    assert ray_start_resources(worker(documented)["rayStartParams"]) == {"moe_ingress": 1}
    refused(lambda d: worker(d)["rayStartParams"].update(resources='{"moe_ingress": 1}'), pydantic.ValidationError)
    refused(lambda d: worker(d)["rayStartParams"].update(resources='"{\\"moe_ingress\\": 0.5}"'),
            pydantic.ValidationError)
    # Inside the pod template, Kubernetes' own schema: a misspelled and a misplaced container field.
    refused(lambda d: ray_container(worker(d)).update(volumeMount=ray_container(worker(d)).pop("volumeMounts")),
            kubernetes_validate.ValidationError)
    probe_to_pod = lambda d: worker(d)["template"]["spec"].update(  # noqa: E731
        readinessProbe=ray_container(worker(d)).pop("readinessProbe"))
    refused(probe_to_pod, kubernetes_validate.ValidationError)
    refused(lambda d: d["spec"]["serveService"]["spec"].update(port=8000), kubernetes_validate.ValidationError)


def test_quantities_parse():
    assert (quantity("16Gi"), quantity("500m"), quantity(8), quantity("2G")) == (16 * 2**30, 0.5, 8, 2e9)
    with pytest.raises(AssertionError):
        quantity("16 GB")


# --- The built overlays ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_overlay_builds_into_valid_kinds(built):
    overlay, docs = built
    budgets = 2 if overlay in ONE_NODE else 3  # the head's, the GPU pods'; autoscaling's api pods'
    # No PersistentVolumeClaim: the volumes live in k8s/storage, so deleting an overlay never deletes them.
    assert sorted(d["kind"] for d in docs) == ["NetworkPolicy"] * 3 + ["PodDisruptionBudget"] * budgets + [
        "PriorityClass", "RayService"]
    for doc in docs:
        if doc["kind"] == "RayService":
            service = validate_rayservice(doc, K8S_VERSION)
            assert service.spec.upgradeStrategy is not None and service.spec.upgradeStrategy.type is not None
            assert service.spec.rayClusterConfig.enableInTreeAutoscaling is not None
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert KUBERAY_VERSION in (ROOT / "k8s" / "README.md").read_text()


@pytest.mark.e2e
def test_serve_config_v2_is_the_deploy_config(built):
    overlay, docs = built
    embedded = yaml.safe_load(only(docs, "RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    serve_args(embedded)
    assert embedded == yaml.safe_load(OVERLAYS[overlay].read_text()), f"{overlay} drifted from {OVERLAYS[overlay]}"


@pytest.mark.e2e
def test_every_group_tells_ray_what_kubernetes_gives_it(built):
    _, docs = built
    for group in workers(only(docs, "RayService")):
        params = group["rayStartParams"]
        gpus, cpus = group_gpus(group), float(params["num-cpus"])
        assert gpus == int(limits(group).get("nvidia.com/gpu", 0)) and cpus == quantity(limits(group)["cpu"])
        # The Ray autoscaler reads a group's resources from the same fields, custom ones included.
        seen = _get_ray_resources_from_group_spec(group, is_head=False)
        assert (seen["CPU"], seen.get("GPU", 0)) == (cpus, gpus), group["groupName"]
        assert {k: seen[k] for k in ray_start_resources(params)} == ray_start_resources(params), group["groupName"]


@pytest.mark.e2e
def test_a_unit_fits_a_gpu_pod_and_the_ingress_its_pods(built):
    overlay, docs = built
    rayservice = only(docs, "RayService")
    args = embedded_args(rayservice)
    plan = plan_of(args)
    bundles = plan.router["placement_group_bundles"]
    unit_gpus, unit_cpus = sum(b.get("GPU", 0) for b in bundles), sum(b["CPU"] for b in bundles)
    ingress = plan.ingress["ray_actor_options"]
    ingress_replicas, ingress_cpus = plan.ingress["num_replicas"], ingress["num_cpus"]
    assert plan.router["placement_group_strategy"] == "STRICT_PACK"  # the unit's bundles share one pod
    # Each overlay takes one branch below: single-node's Ingress goes anywhere, autoscaling's to its api pods.
    assert (args.ingress_resource is None) == (overlay in ONE_NODE)
    (gpu_group,) = gpu_workers(rayservice)
    gpus, cpus = group_gpus(gpu_group), float(gpu_group["rayStartParams"]["num-cpus"])
    assert unit_gpus <= gpus and 2 * unit_gpus > gpus  # one unit per pod: the group's bounds count units
    if args.ingress_resource is None:
        # The Ingress replicas may land anywhere: the GPU pod, the only worker, holds them beside the unit.
        assert workers(rayservice) == [gpu_group] and "resources" not in ingress
        assert unit_cpus + ingress_replicas * ingress_cpus <= cpus, (unit_cpus, ingress_replicas, cpus)
        return
    # The Ingress replicas need the custom resource, which only a CPU-only group advertises: no GPU pod is ever
    # kept from being idle by one, and the GPU pod holds a unit alone.
    assert ingress["resources"] == {args.ingress_resource: 1}
    assert unit_cpus <= cpus
    hosts = [g for g in workers(rayservice) if args.ingress_resource in ray_start_resources(g["rayStartParams"])]
    (api,) = hosts
    assert group_gpus(api) == 0 and "nvidia.com/gpu" not in limits(api)
    per_pod = ray_start_resources(api["rayStartParams"])[args.ingress_resource]  # Ingress replicas a pod holds
    assert api["replicas"] == api["minReplicas"] == api["maxReplicas"]  # fixed: the autoscaler leaves it alone
    assert api["minReplicas"] * per_pod >= ingress_replicas, (api["minReplicas"], per_pod, ingress_replicas)
    assert per_pod * ingress_cpus <= float(api["rayStartParams"]["num-cpus"])


@pytest.mark.e2e
def test_worker_group_bounds_cover_the_units(built):
    overlay, docs = built
    rayservice = only(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    (group,) = gpu_workers(rayservice)
    plan = served_plan_of(rayservice)
    scaling = plan.router.get("autoscaling_config")
    if overlay == "autoscaling":
        assert scaling is not None and cluster["enableInTreeAutoscaling"] is True
        assert group["minReplicas"] <= scaling["min_replicas"] <= scaling["max_replicas"] < group["maxReplicas"]
        # v2 drains a node before deleting its pod.
        assert cluster["autoscalerOptions"]["version"] == "v2"
        assert rayservice["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    else:
        assert scaling is None and cluster["enableInTreeAutoscaling"] is False
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == plan.router["num_replicas"]


@pytest.mark.e2e
def test_the_head_has_no_gpus_and_runs_no_replica(built):
    _, docs = built
    head = only(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        resources = container.get("resources", {})
        assert not any("gpu" in name for part in resources.values() for name in part)
    assert not head["template"]["spec"].get("tolerations")


@pytest.mark.e2e
def test_one_image_everywhere_and_ray_version_is_the_images(built):
    _, docs = built
    rayservice = only(docs, "RayService")
    images = {c["image"] for _, g in groups(rayservice) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and ":" in images.pop()  # kustomize's `images:` set one tagged image
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray_version


@pytest.mark.e2e
def test_storage_holds_every_claim_the_pods_mount(built, storage):
    _, docs = built
    claims = {d["metadata"]["name"]: d for d in storage if d["kind"] == "PersistentVolumeClaim"}
    assert [d["kind"] for d in storage] == ["PersistentVolumeClaim"] * len(claims) and len(claims) == 2
    for doc in storage:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    for name, group in groups(only(docs, "RayService")):
        for volume in group["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (name, volume)


@pytest.mark.e2e
def test_the_compiled_kernels_persist_on_every_gpu_pod(built, storage):
    _, docs = built
    (cache,) = [d for d in storage if d["metadata"]["name"] == "moe-cluster-compile-cache"]
    assert cache["spec"]["accessModes"] == ["ReadWriteMany"]  # every GPU pod writes it
    gpu_groups = gpu_workers(only(docs, "RayService"))
    assert gpu_groups
    for group in gpu_groups:
        path = PurePosixPath(env_of(group)["TRITON_CACHE_DIR"]["value"])
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        (mount,) = [m for m in ray_container(group)["volumeMounts"] if path.is_relative_to(m["mountPath"])]
        assert not mount.get("readOnly")
        assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": cache["metadata"]["name"]}


@pytest.mark.e2e
def test_the_checkpoint_is_mounted_read_only_wherever_a_replica_can_run(built, storage):
    _, docs = built
    rayservice = only(docs, "RayService")
    args = embedded_args(rayservice)
    (claim,) = [d for d in storage if d["metadata"]["name"] == "moe-cluster-models"]
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    models_dir = str(PurePosixPath(args.model).parent)
    for name, group in groups(rayservice):
        if group["rayStartParams"]["num-cpus"] == "0" and group["rayStartParams"]["num-gpus"] == "0":
            continue  # nothing can be placed here (the head)
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        mounts = [m for m in ray_container(group).get("volumeMounts", []) if m["mountPath"] == models_dir]
        assert len(mounts) == 1 and mounts[0].get("readOnly") is True, f"{name}: no read-only {models_dir}"
        source = volumes[mounts[0]["name"]]["persistentVolumeClaim"]
        assert source == {"claimName": claim["metadata"]["name"], "readOnly": True}


@pytest.mark.e2e
def test_pods_outlive_the_graceful_shutdown_and_drain_first(built):
    _, docs = built
    rayservice = only(docs, "RayService")
    plan = plan_of(embedded_args(rayservice))
    grace = max(plan.router["graceful_shutdown_timeout_s"], plan.ingress["graceful_shutdown_timeout_s"])
    port = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"])).http_options.port
    for group in workers(rayservice):
        container = ray_container(group)
        script = container["lifecycle"]["preStop"]["exec"]["command"][-1]
        drain, sleep = (shlex.split(step) for step in script.split(";"))
        assert drain[:2] == ["ray", "drain-node"] and "--node-id" not in drain  # this pod's own node
        assert drain[drain.index("--reason") + 1] == "DRAIN_NODE_REASON_PREEMPTION"
        deadline = int(drain[drain.index("--deadline-remaining-seconds") + 1])
        # Serve stops a draining node's replicas at deadline - graceful_shutdown_timeout_s: that must come after
        # the drain starts, and the node must stay up to the deadline.
        assert deadline >= grace + SERVE_NOTICE_S, (deadline, grace)
        assert sleep[0] == "sleep" and int(sleep[1]) >= deadline
        # After SIGTERM, `ray start --block` drains again for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S.
        ray_drain = float(env_of(group).get(DRAIN_ENV, {}).get(
            "value", ray_constants.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S))
        period = group["template"]["spec"]["terminationGracePeriodSeconds"]
        assert period >= DRAIN_CALL_S + int(sleep[1]) + ray_drain + RAY_STOP_S, (group["groupName"], period)
        # Ready only while this pod's proxy admits (/-/healthz) and, on a pod clients reach, the app answers /health
        # (through that proxy, any Ingress replica); two failures in a row take the pod out. A pod no client
        # reaches leaves /health out: an Ingress outage would turn every such pod unready (and evictable) at once.
        probe = " ".join(container["readinessProbe"]["exec"]["command"])
        serves_clients = group["groupName"] in ingress_hosts(rayservice)
        for path, wanted in (("/-/healthz", True), ("/health", serves_clients)):
            found = re.search(rf"http://localhost:{port}{re.escape(path)}(\s|$)", probe) is not None
            assert found == wanted, (group["groupName"], path)
        assert container["readinessProbe"]["failureThreshold"] == 2, group["groupName"]
    # The head: Ray's own drain after SIGTERM fits its grace period (Kubernetes' default: 30 s).
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    ray_drain = float(env_of(head).get(DRAIN_ENV, {}).get("value", ray_constants.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S))
    assert head["template"]["spec"].get("terminationGracePeriodSeconds", 30) >= ray_drain + RAY_STOP_S


@pytest.mark.e2e
def test_every_group_has_a_sized_shm_ports_and_gpu_placement(built):
    _, docs = built
    rayservice = only(docs, "RayService")
    for name, group in groups(rayservice):
        spec, container = group["template"]["spec"], ray_container(group)
        (shm,) = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert {"name": shm["name"], "mountPath": "/dev/shm"} in container["volumeMounts"], name
        size = quantity(shm["emptyDir"]["sizeLimit"])
        # Ray's object store lives there; a memory-backed emptyDir counts against the container's memory.
        assert quantity(group["rayStartParams"]["object-store-memory"]) <= size <= quantity(limits(group)["memory"])
        # Ray's metrics on the port k8s/monitoring's PodMonitor scrapes by name; Serve on the port KubeRay finds.
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"]) == 8080, name
        # The serve Service picks its endpoints by the port's name: only pods that may run an Ingress replica (and
        # the head, which KubeRay reads the port from and the Service leaves out) declare it.
        declares = ports.get("serve") == 8000
        assert declares == (name == "head" or name in ingress_hosts(rayservice)), name
        if int(limits(group).get("nvidia.com/gpu", 0)) > 0:
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert spec["nodeSelector"], name
        else:  # a CPU-only pod stays off the GPU nodes
            assert not spec.get("tolerations") and not spec.get("nodeSelector"), name


@pytest.mark.e2e
def test_the_service_and_the_disruption_budgets_select_the_right_pods(built):
    _, docs = built
    rayservice = only(docs, "RayService")
    service = rayservice["spec"]["serveService"]
    # By name: only pods declaring a port `serve` are endpoints (see the ports test).
    assert service["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": "serve"}]
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True  # the head runs no Ingress
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    plan = served_plan_of(rayservice)
    floor = plan.router.get("autoscaling_config", {}).get("min_replicas", plan.router.get("num_replicas"))
    for name, group in groups(rayservice):
        labels = group["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "moe-cluster", name  # k8s/monitoring's PodMonitor selects it
        (budget,) = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        # KubeRay's pods have no controller with a scale subresource: a maxUnavailable or percentage budget would
        # allow no eviction at all (every drain hangs). An integer minAvailable is computed from the pods alone.
        assert_evictable_budget(budget["spec"])
        least = budget["spec"]["minAvailable"]
        if name == "head":
            assert least == 1  # never evicted voluntarily: its loss restarts the cluster
        elif group_gpus(group) > 0:
            assert least == floor, (least, floor)  # the units the serve config promises stay
        else:  # the api pods: one Ingress replica always serves, and one pod at a time may go
            assert 1 <= least < group["minReplicas"], (name, least)


def assert_evictable_budget(spec: dict[str, Any]) -> None:
    assert "maxUnavailable" not in spec, "maxUnavailable on Ray pods allows no eviction (no scale subresource)"
    assert type(spec.get("minAvailable")) is int, f"minAvailable must be an integer, not {spec.get('minAvailable')!r}"


def test_a_budget_on_ray_pods_must_be_an_integer_min_available():
    assert_evictable_budget({"minAvailable": 1})
    for refused in ({"maxUnavailable": 1}, {"minAvailable": "50%"}, {}):
        with pytest.raises(AssertionError):
            assert_evictable_budget(refused)


@pytest.mark.e2e
def test_the_ledger_password_comes_from_a_secret_on_every_pod(built):
    overlay, docs = built
    rayservice = only(docs, "RayService")
    args = embedded_args(rayservice)
    assert all(d["kind"] != "Secret" for d in docs)  # no secret is committed: k8s/README.md creates it
    hosts = ingress_hosts(rayservice)
    for name, group in groups(rayservice):
        env = env_of(group)
        # Only the pods that run an Ingress replica open the ledger: the password stays off the head and GPU pods.
        if args.db is None or name not in hosts:
            assert LEDGER_ENV not in env, name
            continue
        assert env[LEDGER_ENV]["valueFrom"]["secretKeyRef"].keys() == {"name", "key"}, name
    assert (args.db is not None) == (overlay == "autoscaling")


@pytest.mark.e2e
def test_every_pod_passes_the_restricted_pod_security_standard(built):
    _, docs = built
    rayservice = only(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    for name, group in groups(rayservice):
        spec = copy.deepcopy(group["template"]["spec"])
        if name == "head" and cluster["enableInTreeAutoscaling"]:
            # The autoscaler sidecar KubeRay adds to the head: its securityContext is autoscalerOptions' alone.
            options = cluster.get("autoscalerOptions", {})
            spec["containers"].append({"name": "autoscaler", **(
                {"securityContext": options["securityContext"]} if "securityContext" in options else {})})
        assert restricted_violations(spec) == [], name


def test_the_restricted_check_refuses_what_the_standard_refuses():
    base = yaml.safe_load((ROOT / "k8s" / "base" / "rayservice.yaml").read_text())
    spec = base["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert restricted_violations(spec) == []
    changes = [
        lambda s: s["securityContext"].pop("runAsNonRoot"),
        lambda s: s["securityContext"].pop("seccompProfile"),
        lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
        lambda s: s["volumes"].append({"name": "host", "hostPath": {"path": "/var"}}),
        lambda s: s.update(hostNetwork=True),
    ]
    for change in changes:
        changed = copy.deepcopy(spec)
        change(changed)
        assert restricted_violations(changed), change


@pytest.mark.e2e
def test_ray_is_token_authenticated_and_its_ports_reach_only_its_own_pods(built):
    _, docs = built
    rayservice = only(docs, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"]["mode"] == "token"
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    hosts = ingress_hosts(rayservice)
    outsider = Pod({"app": "somebody-else"}, namespace="elsewhere")
    neighbour = Pod({"app": "somebody-else"})
    # The operator's pods as KubeRay's Helm chart and its kustomize install label them.
    operators = [Pod({"app.kubernetes.io/name": name, "app.kubernetes.io/component": "kuberay-operator"},
                     namespace="kuberay") for name in ("kuberay-operator", "kuberay")]
    for name, group in groups(rayservice):
        container = ray_container(group)
        pod = Pod(group["template"]["metadata"]["labels"], {p["name"]: p["containerPort"] for p in container["ports"]})
        peer = Pod({"app.kubernetes.io/name": "moe-cluster", "app.kubernetes.io/component": "gpu-worker"})
        for port in (6379, 8265, 10001, 52365):  # GCS, dashboard (jobs API), client, dashboard agent
            assert admits(policies, peer, pod, port), (name, port)
            assert not admits(policies, outsider, pod, port) and not admits(policies, neighbour, pod, port), (
                name, port)
        assert admits(policies, outsider, pod, 8080), name  # Prometheus, wherever it runs
        for operator in operators:  # KubeRay deploys the app through the head's dashboard
            assert admits(policies, operator, pod, 8265) == (name == "head"), name
        if name in hosts:
            assert admits(policies, outsider, pod, 8000), name  # the API


@pytest.mark.e2e
def test_the_head_survives_its_loss_where_units_scale(built):
    overlay, docs = built
    rayservice = only(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (priority,) = [d for d in docs if d["kind"] == "PriorityClass"]
    assert head["priorityClassName"] == priority["metadata"]["name"] and priority["value"] > 0
    options = cluster.get("gcsFaultToleranceOptions")
    if overlay in ONE_NODE:
        assert options is None  # one node: the head goes with it
        return
    assert options["redisAddress"] and options["redisPassword"]["valueFrom"]["secretKeyRef"]["key"]
    # Streams that began before a NewCluster switch have this long before the old cluster's pods drain.
    assert rayservice["spec"]["rayClusterDeletionDelaySeconds"] >= 600
