"""A strict schema of the RayService fields k8s/ uses, written from KubeRay v1.7.0's documented `ray.io/v1` API
(ray-operator/apis/ray/v1/rayservice_types.go and raycluster_types.go at that release).

No cluster is reachable here, so nothing would tell a misspelled or misplaced field from a real one: the API server
prunes unknown fields of a custom resource silently, and KubeRay then runs with its defaults. Every model forbids
fields it does not declare, and the Go types are kept strictly (a `map[string]string` takes no integers, an `*int32`
no strings). Pod templates and the serve Service are core Kubernetes types: they are checked against Kubernetes'
own strict schemas (kubernetes-validate). A field the manifests start using is added here from the KubeRay API
reference of that release, with its Go type. `rayStartParams` become `ray start` flags (KubeRay writes
`--KEY=VALUE` into the shell command that starts Ray): each key must be a flag of the `ray start` in this
environment, the image's Ray, and `resources` must be a JSON object quoted for that shell.
"""

from __future__ import annotations

import json
import shlex
from typing import Annotated, Any, Literal

import kubernetes_validate
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      model_validator)
from ray.scripts.scripts import start as ray_start

KUBERAY_VERSION = "v1.7.0"
_INT32_MAX = 2**31 - 1


_RAY_START_FLAGS = frozenset(opt[2:] for param in ray_start.params for opt in param.opts + param.secondary_opts
                              if opt.startswith("--"))


def ray_start_resources(params: dict[str, str] | None) -> dict[str, int]:
    r"""The custom resources a group's rayStartParams advertise, read as the shell running `ray start` reads them
    (KubeRay's documented form: `resources: '"{\"Custom1\": 1}"'`); {} without `resources`. Whole amounts only:
    the Ray autoscaler refuses others."""
    if not params or "resources" not in params:
        return {}
    words = shlex.split(params["resources"])
    if len(words) != 1:
        raise ValueError(f"resources {params['resources']!r} is {len(words)} shell words: quote the JSON")
    resources = json.loads(words[0])
    if not isinstance(resources, dict) or not all(
            type(amount) is int and amount >= 0 for amount in resources.values()):
        raise ValueError(f"resources {params['resources']!r}: not a JSON object of whole amounts")
    return resources


def _check_ray_start_params(params: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(params) - _RAY_START_FLAGS)
    if unknown:
        raise ValueError(f"not `ray start` flags: {unknown}")
    ray_start_resources(params)
    return params


RayStartParams = Annotated[dict[StrictStr, StrictStr], AfterValidator(_check_ray_start_params)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ObjectMeta(_Strict):
    name: StrictStr
    namespace: StrictStr | None = None
    labels: dict[StrictStr, StrictStr] | None = None
    annotations: dict[StrictStr, StrictStr] | None = None


class RayServiceUpgradeStrategy(_Strict):
    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] | None = None


class AutoscalerOptions(_Strict):
    version: Literal["v1", "v2"] | None = None
    securityContext: dict[str, Any] | None = None  # corev1.SecurityContext: checked by `validate_rayservice`
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] | None = None
    idleTimeoutSeconds: StrictInt | None = Field(None, ge=0, le=_INT32_MAX)  # *int32


class HeadGroupSpec(_Strict):
    rayStartParams: RayStartParams | None = None
    template: dict[str, Any]  # corev1.PodTemplateSpec: checked by `validate_rayservice`


class WorkerGroupSpec(_Strict):
    groupName: StrictStr
    replicas: StrictInt | None = Field(None, ge=0, le=_INT32_MAX)  # *int32
    minReplicas: StrictInt | None = Field(None, ge=0, le=_INT32_MAX)  # *int32
    maxReplicas: StrictInt | None = Field(None, ge=0, le=_INT32_MAX)  # *int32
    rayStartParams: RayStartParams | None = None
    template: dict[str, Any]  # corev1.PodTemplateSpec: checked by `validate_rayservice`

    @model_validator(mode="after")
    def _bounds(self) -> "WorkerGroupSpec":
        """KubeRay's validation: minReplicas <= maxReplicas (and replicas between them when set)."""
        low, high = self.minReplicas or 0, _INT32_MAX if self.maxReplicas is None else self.maxReplicas
        if low > high:
            raise ValueError(f"worker group {self.groupName}: minReplicas {low} > maxReplicas {high}")
        if self.replicas is not None and not low <= self.replicas <= high:
            raise ValueError(f"worker group {self.groupName}: replicas {self.replicas} outside [{low}, {high}]")
        return self


class SecretKeySelector(_Strict):
    name: StrictStr
    key: StrictStr
    optional: StrictBool | None = None


class EnvVarSource(_Strict):  # corev1.EnvVarSource, the part a Secret reference uses
    secretKeyRef: SecretKeySelector


class RedisCredential(_Strict):
    valueFrom: EnvVarSource | None = None
    value: StrictStr | None = None


class GcsFaultToleranceOptions(_Strict):
    backend: Literal["redis", "rocksdb"] | None = None
    redisUsername: RedisCredential | None = None
    redisPassword: RedisCredential | None = None
    externalStorageNamespace: StrictStr | None = None
    redisAddress: StrictStr | None = None


class AuthOptions(_Strict):
    mode: Literal["disabled", "token"] | None = None
    secretName: StrictStr | None = None
    enableK8sTokenAuth: StrictBool | None = None


class RayClusterSpec(_Strict):
    rayVersion: StrictStr | None = None
    enableInTreeAutoscaling: StrictBool | None = None
    autoscalerOptions: AutoscalerOptions | None = None
    authOptions: AuthOptions | None = None
    gcsFaultToleranceOptions: GcsFaultToleranceOptions | None = None
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] | None = None


class RayServiceSpec(_Strict):
    serveConfigV2: StrictStr | None = None
    rayClusterConfig: RayClusterSpec
    serveService: dict[str, Any] | None = None  # corev1.Service: checked by `validate_rayservice`
    excludeHeadPodFromServeSvc: StrictBool | None = None
    upgradeStrategy: RayServiceUpgradeStrategy | None = None
    rayClusterDeletionDelaySeconds: StrictInt | None = Field(None, ge=0, le=_INT32_MAX)  # *int32


class RayService(_Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: ObjectMeta
    spec: RayServiceSpec


def validate_rayservice(doc: dict[str, Any], k8s_version: str) -> RayService:
    """`doc` against the KubeRay model above and its pod templates and serve Service against Kubernetes' strict
    schemas of `k8s_version`; raises pydantic's or kubernetes-validate's ValidationError."""
    service = RayService.model_validate(doc)
    cluster = service.spec.rayClusterConfig
    groups = [("head", cluster.headGroupSpec.template)]
    groups += [(g.groupName, g.template) for g in cluster.workerGroupSpecs or []]
    for name, template in groups:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                                      "template": template}, k8s_version, strict=True)
    options = cluster.autoscalerOptions
    if options is not None and options.securityContext is not None:  # the sidecar KubeRay adds to the head
        sidecar = {"name": "autoscaler", "image": "autoscaler", "securityContext": options.securityContext}
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "autoscaler"},
                                      "template": {"spec": {"containers": [sidecar]}}}, k8s_version, strict=True)
    if service.spec.serveService is not None:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", **service.spec.serveService},
                                     k8s_version, strict=True)
    return service
