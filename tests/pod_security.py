"""The "restricted" Pod Security Standard (Kubernetes' Pod Security Admission, policy version latest), as a check of a
pod spec: what a namespace labelled `pod-security.kubernetes.io/enforce: restricted` admits. Written from the
standard's published controls; each returns the violations it finds, so a test can show that a change is refused."""

from __future__ import annotations

from typing import Any

# Volume types the restricted profile allows.
_ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                    "secret"}
_HOST_NAMESPACES = ("hostNetwork", "hostPID", "hostIPC")


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """What in `pod_spec` (a PodSpec as a dict) the restricted profile refuses; [] when it admits the pod."""
    found = [f"{field} is set" for field in _HOST_NAMESPACES if pod_spec.get(field)]
    for volume in pod_spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _ALLOWED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds - _ALLOWED_VOLUMES)} not allowed")
    pod_context = pod_spec.get("securityContext", {})
    if pod_context.get("runAsUser") == 0:
        found.append("the pod runs as uid 0")
    containers = pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
    for container in containers:
        found += [f"{container['name']}: {problem}" for problem in _container_violations(container, pod_context)]
    return found


def _container_violations(container: dict[str, Any], pod_context: dict[str, Any]) -> list[str]:
    context = container.get("securityContext", {})
    found = []
    if context.get("privileged"):
        found.append("privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        found.append("allowPrivilegeEscalation is not false")
    capabilities = context.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []):
        found.append("capabilities do not drop ALL")
    if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
        found.append(f"capabilities add {capabilities['add']}")
    if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot", False)):
        found.append("runAsNonRoot is not true (on the container or the pod)")
    if context.get("runAsUser") == 0:
        found.append("runs as uid 0")
    seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        found.append("no RuntimeDefault or Localhost seccomp profile")
    if any(port.get("hostPort") for port in container.get("ports", [])):
        found.append("a hostPort")
    return found
