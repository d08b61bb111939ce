"""Which connections a set of Kubernetes NetworkPolicies (ingress rules only) admits, as a CNI that enforces them
decides: a pod no Ingress policy selects accepts everything; a selected pod accepts a connection that some rule of
some selecting policy admits (a peer that matches and a port that matches, an empty list matching all). Label
selectors with matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist); named ports resolve through the
destination's container ports. All pods are taken to be in one namespace, except a peer's `namespaceSelector: {}`,
which admits every namespace."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    labels: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)  # container port name -> number
    namespace: str = "moe"


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {"In": present and labels[key] in values, "NotIn": not present or labels[key] not in values,
                "Exists": present, "DoesNotExist": not present}[operator]:
            return False
    return True


def _peer_matches(peer: dict[str, Any], source: Pod, destination: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # pods are not addressed by IP block here
    if "namespaceSelector" in peer:
        if peer["namespaceSelector"] != {}:
            raise ValueError(f"only namespaceSelector {{}} is modelled, not {peer['namespaceSelector']}")
    elif source.namespace != destination.namespace:
        return False
    return selects(peer.get("podSelector", {}), source.labels)


def _port_matches(rule_port: dict[str, Any], port: int, destination: Pod) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    wanted = rule_port.get("port")
    if wanted is None:
        return True
    return (destination.ports.get(wanted) if isinstance(wanted, str) else wanted) == port


def admits(policies: list[dict[str, Any]], source: Pod, destination: Pod, port: int) -> bool:
    """Whether a TCP connection from `source` to `destination` on `port` gets through `policies`."""
    selecting = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], destination.labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers, ports = rule.get("from", []), rule.get("ports", [])
            if (not peers or any(_peer_matches(p, source, destination) for p in peers)) and (
                    not ports or any(_port_matches(p, port, destination) for p in ports)):
                return True
    return False
