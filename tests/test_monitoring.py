"""k8s/monitoring, checked offline: the PodMonitors' relabelling (applied here as Prometheus applies it) gives Ray's
export the single process's names and the `engine`, `ray_io_cluster` labels; every metric an alert or a dashboard
panel queries is one this project exports or one of a short list of others, each found in the installed Ray; the
head's autoscaler and dashboard exporters are scraped; `kubectl kustomize` builds it, and the ports it scrapes are
declared on the pods it selects and open to Prometheus in every overlay.

`scraped` and `project_queried` serve tests/test_metrics.py's live check of Ray's export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.metrics import names as mn
from tests.tools import kustomize

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "k8s" / "monitoring"
OVERLAYS = ROOT / "k8s" / "overlays"
APP = "moe-cluster"  # the Serve application (deploy/serve_config*.yaml)
HEAD_PORTS = {"as-metrics": 44217, "dash-metrics": 44227}  # the head's autoscaler and dashboard exporters, by name

# Metrics the dashboard and the alerts query that this project does not export, and who exports them; each is
# checked against the installed Ray (`test_the_other_metrics_are_what_ray_exports`).
OTHER_METRICS = {
    "up": "Prometheus itself: 1 while a target answers its scrape",
    "ray_serve_num_http_requests_total": "Ray Serve's proxies, on each Ray pod's `metrics` port",
    "ray_serve_deployment_replica_healthy": "Ray Serve's controller, on the head's `metrics` port",
    "ray_serve_deployment_status": "Ray Serve's controller, on the head's `metrics` port",
    "autoscaler_active_nodes": "Ray's autoscaler, on the head's `as-metrics` port",
    "autoscaler_pending_nodes": "Ray's autoscaler, on the head's `as-metrics` port",
}


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MONITORING / name).read_text()) if d]


def _pod_monitor(name: str) -> dict[str, Any]:
    (monitor,) = [d for d in _docs("podmonitor.yaml") if d["metadata"]["name"] == name]
    return monitor


def _rules() -> list[dict[str, Any]]:
    (rule,) = _docs("prometheusrule.yaml")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def _dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "moe-cluster-dashboard.json").read_text())


# -- Prometheus' relabelling -----------------------------------------------------------------------------------------
def _expand(template: str, match: re.Match[str]) -> str:
    """Go's Regexp.Expand, as Prometheus fills `replacement` and `targetLabel`: `$name` takes the longest run of
    letters, digits and '_' (so `$1_x` names the group "1_x", empty), `${name}` is explicit, `$$` is '$'."""
    def group(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name = m[1] or m[2]
        if name.isdigit():
            index = int(name)
            return (match.group(index) or "") if index <= (match.re.groups or 0) else ""
        return (match.groupdict().get(name) or "")

    return re.sub(r"\$\$|\$\{(\w+)\}|\$(\w+)", group, template)


def relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """`labels` after the Prometheus Operator's `relabelings` / `metricRelabelings` (None: dropped). The regex is
    anchored at both ends as Prometheus anchors it; an action this does not know fails the test."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace").lower()
        regex = re.compile(f"^(?:{rule.get('regex', '(.*)')})$")
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule.get("sourceLabels", []))
        match = regex.fullmatch(value)
        if action == "replace":
            if match is not None:
                target, result = _expand(rule["targetLabel"], match), _expand(rule.get("replacement", "$1"), match)
                if result:
                    labels[target] = result
                else:
                    labels.pop(target, None)
        elif action in ("keep", "drop"):
            if (match is None) == (action == "keep"):
                return None
        elif action in ("labeldrop", "labelkeep"):
            labels = {k: v for k, v in labels.items() if (regex.fullmatch(k) is None) == (action == "labeldrop")}
        elif action == "labelmap":
            for name, v in list(labels.items()):
                if (found := regex.fullmatch(name)) is not None:
                    labels[_expand(rule.get("replacement", "$1"), found)] = v
        else:
            raise AssertionError(f"relabel action {action!r} is not implemented here")
    return labels


def scraped(name: str, labels: dict[str, str]) -> dict[str, str] | None:
    """A sample of Ray's metrics agent as Prometheus stores it after the `moe-cluster` PodMonitor's
    metricRelabelings: its labels, the name under `__name__` (None: dropped)."""
    (endpoint,) = _pod_monitor("moe-cluster")["spec"]["podMetricsEndpoints"]
    return relabel(endpoint.get("metricRelabelings", []), {"__name__": name, **labels})


def test_relabelling_gives_rays_export_the_single_process_names():
    worker = "3f2a" * 14
    ttft = scraped("ray_vllm_time_to_first_token_seconds_bucket", {"WorkerId": worker, "le": "0.5"})
    assert ttft == {"__name__": "vllm:time_to_first_token_seconds_bucket", "WorkerId": worker, "le": "0.5",
                    "engine": worker}
    experts = scraped("ray_moe_cluster_expert_tokens_total", {"WorkerId": worker, "layer": "3"})
    assert experts == {"__name__": "moe_cluster_expert_tokens_total", "WorkerId": worker, "layer": "3"}
    assert scraped("ray_vllm_num_requests_running", {}) == {"__name__": "vllm:num_requests_running"}  # no WorkerId
    serve = {"__name__": "ray_serve_num_http_requests_total", "WorkerId": worker, "status_code": "503"}
    assert scraped(serve["__name__"], serve) == serve
    # Anchored: a name that only contains the prefix, or has nothing after it, is left alone.
    for other in ("xray_vllm_foo", "ray_vllm_", "ray_moe_cluster_"):
        assert scraped(other, {})["__name__"] == other
    # Every series of every metric, Ray's name to the single process's, vLLM's with their engine.
    for spec in mn.ALL:
        for ray_name, name in zip(spec.scraped_names(ray=True), spec.scraped_names(ray=False), strict=True):
            got = scraped(ray_name, {"WorkerId": worker, "model_name": "m"})
            assert got is not None and got["__name__"] == name, (ray_name, got)
            assert got.get("engine") == (worker if spec.per_engine else None), (ray_name, got)


def test_the_relabelling_here_is_prometheus():
    """The implementation above, on rules whose outcome Prometheus documents."""
    rule = {"sourceLabels": ["__name__"], "regex": "vllm", "targetLabel": "x", "replacement": "hit"}
    assert "x" not in relabel([rule], {"__name__": "ray_vllm_x"})  # anchored: no match inside the value
    rule = {"sourceLabels": ["__name__"], "regex": "ray_(.+)", "targetLabel": "x", "replacement": "$1_y"}
    assert "x" not in relabel([rule], {"__name__": "ray_a"})  # `$1_y` names group "1_y": empty, label removed
    rule["replacement"] = "${1}_y"
    assert relabel([rule], {"__name__": "ray_a"})["x"] == "a_y"
    two = {"sourceLabels": ["a", "b"], "regex": "(.+);(.+)", "targetLabel": "c", "replacement": "$2-$1"}
    assert relabel([two], {"a": "1", "b": "2"})["c"] == "2-1" and "c" not in relabel([two], {"a": "1"})
    assert relabel([{"action": "drop", "sourceLabels": ["a"], "regex": "1"}], {"a": "1"}) is None


def test_every_target_carries_its_ray_cluster_and_node_group():
    pod = {"__meta_kubernetes_pod_label_ray_io_cluster": "moe-cluster-x7k2p",
           "__meta_kubernetes_pod_label_app_kubernetes_io_component": "ray-head"}
    endpoints = [ep for name in ("moe-cluster", "moe-cluster-head")
                 for ep in _pod_monitor(name)["spec"]["podMetricsEndpoints"]]
    assert len(endpoints) == 3
    for endpoint in endpoints:
        target = relabel(endpoint.get("relabelings", []), pod)
        assert target is not None and target["ray_io_cluster"] == "moe-cluster-x7k2p", endpoint["port"]
    (metrics,) = _pod_monitor("moe-cluster")["spec"]["podMetricsEndpoints"]
    assert metrics["port"] == "metrics"
    assert relabel(metrics["relabelings"], pod)["ray_component"] == "ray-head"


def test_the_heads_autoscaler_and_dashboard_are_scraped():
    """By the port names KubeRay's samples give Ray's two head-only exporters, whose ports the installed Ray says."""
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    head = _pod_monitor("moe-cluster-head")["spec"]
    assert head["selector"]["matchLabels"] == {"app.kubernetes.io/name": "moe-cluster",
                                               "app.kubernetes.io/component": "ray-head"}
    assert {ep["port"]: ep.get("path", "/metrics") for ep in head["podMetricsEndpoints"]} == {
        "as-metrics": "/metrics", "dash-metrics": "/metrics"}
    assert (AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT) == (HEAD_PORTS["as-metrics"], HEAD_PORTS["dash-metrics"])
    readme = (MONITORING / "README.md").read_text()
    for port, number in HEAD_PORTS.items():
        assert f"`{port}`, {number}" in readme or f"`{port}` ({number})" in readme, port



# -- what the alerts and the dashboard query -------------------------------------------------------------------------
_NOT_METRICS = {  # PromQL's keywords and aggregation operators
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf",
    "nan", "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana `label_values(metric, label)` query) selects."""
    if (query := re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.S)) is not None:
        expr = query[1]
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ", expr)
    found = set()
    for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", expr):
        if not expr[m.end():].lstrip().startswith("(") and m[0].lower() not in _NOT_METRICS:
            found.add(m[0])
    return found


def test_metric_names_are_read_from_promql():
    expr = ('histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:ttft_bucket{model_name=~"a|b", x="y z"}'
            '[$__rate_interval]))) > 1e3 and on (model_name) max without (engine) (up offset 5m) / count(a_b)')
    assert metric_names(expr) == {"vllm:ttft_bucket", "up", "a_b"}
    assert metric_names('label_values(moe_cluster_expert_tokens_total{model_name=~"$model_name"}, layer)') == {
        "moe_cluster_expert_tokens_total"}
    assert metric_names('absent(up{job=~".+/moe-cluster"} == 1)') == {"up"}


def _dashboard_exprs(node: Any) -> list[str]:
    """Every PromQL expression in a dashboard: targets' `expr` and template variables' queries."""
    if isinstance(node, dict):
        found = [node[k] for k in ("expr", "definition") if isinstance(node.get(k), str)]
        return found + [e for v in node.values() for e in _dashboard_exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _dashboard_exprs(v)]
    return []


def _queried() -> tuple[set[str], set[str]]:
    """(the dashboard's metrics, the alerts' metrics)."""
    dashboard = {n for e in _dashboard_exprs(_dashboard()) for n in metric_names(e)}
    return dashboard, {n for r in _rules() for n in metric_names(r["expr"])}


def _exported() -> set[str]:
    return {n for spec in mn.ALL for n in spec.scraped_names(ray=False)}


def project_queried() -> set[str]:
    """The metrics of this project (names as Prometheus stores them) that the dashboard or an alert queries."""
    dashboard, rules = _queried()
    return (dashboard | rules) & _exported()


def test_alerts_and_dashboard_query_only_known_metrics():
    dashboard, rules = _queried()
    unknown = (dashboard | rules) - _exported() - set(OTHER_METRICS)
    assert dashboard and rules and not unknown, sorted(unknown)
    assert not any(n.startswith(("ray_vllm_", "ray_moe_cluster_")) for n in dashboard | rules)
    charted = {spec.name for spec in mn.ALL if set(spec.scraped_names(ray=False)) & dashboard}
    required = {mn.RUNNING, mn.WAITING, mn.KV_CACHE_USAGE, mn.TTFT, mn.ITL, mn.E2E, mn.QUEUE, mn.PROMPT_TOKENS,
                mn.GENERATION_TOKENS, mn.REQUEST_SUCCESS, mn.EXPERT_TOKENS, mn.SHARD_ROUND_TRIP, mn.UNIT_STATE,
                mn.UNIT_RECOVERIES, mn.GPU_MEMORY_USED, mn.GPU_UTILIZATION, mn.REQUESTS_REFUSED}
    assert {s.name for s in required} <= charted, sorted({s.name for s in required} - charted)
    # Each alert source is charted too, and every other metric listed is used somewhere.
    assert set(OTHER_METRICS) <= dashboard, sorted(set(OTHER_METRICS) - dashboard)
    assert {"up", "ray_serve_num_http_requests_total", "ray_serve_deployment_replica_healthy",
            "ray_serve_deployment_status", "autoscaler_pending_nodes", "vllm:num_requests_running",
            "vllm:time_to_first_token_seconds_bucket", "moe_cluster_unit_state", "vllm:kv_cache_usage_perc"} <= rules


def test_the_alerts():
    rules = {r["alert"]: r for r in _rules()}
    assert len(rules) == len(_rules())
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"], name
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), name
    expr = {name: " ".join(rule["expr"].split()) for name, rule in rules.items()}
    # No endpoints: no target of the Ray pods' PodMonitor up, no engine exporting, no healthy Serve replica.
    assert expr["MoeClusterMetricsDown"] == 'absent(up{job=~".+/moe-cluster"} == 1)'
    assert expr["MoeClusterNoEngine"] == "absent(vllm:num_requests_running)"
    assert "ray_serve_deployment_replica_healthy" in expr["MoeClusterNoHealthyReplicas"]
    assert expr["MoeClusterNoHealthyReplicas"].endswith("== 0")
    # The API's 5xx and 503 shares, from Serve's count of responses by status.
    assert 'status_code=~"5.."' in expr["MoeClusterHighServerErrorRate"]
    assert 'status_code="503"' in expr["MoeClusterUnavailable503"]
    for name in ("MoeClusterHighServerErrorRate", "MoeClusterUnavailable503", "MoeClusterNoHealthyReplicas",
                 "MoeClusterServeDeploymentUnhealthy"):
        assert f'application="{APP}"' in expr[name], name
    # vLLM's series are per engine.
    assert "by (model_name, engine)" in expr["MoeClusterKVCacheFull"]


def test_the_other_metrics_are_what_ray_exports():
    """Each of OTHER_METRICS (but Prometheus' `up`) under the name and labels the installed Ray exports."""
    from ray.autoscaler._private.prom_metrics import AutoscalerPrometheusMetrics
    from ray.serve._private import deployment_state
    from ray.serve._private.common import DeploymentStatus, RequestProtocol
    from ray.serve._private.request_ingress_metrics import RequestIngressMetrics

    # Ray exports `ray.util.metrics` with `ray_` before the name and counters with `_total` after it.
    http = RequestIngressMetrics(RequestProtocol.HTTP, source="proxy", node_id="n", node_ip_address="i")
    assert f"ray_{http.request_counter._name}_total" == "ray_serve_num_http_requests_total"
    assert {"status_code", "application"} <= set(http.request_counter._tag_keys)
    source = Path(deployment_state.__file__).read_text()
    for name in ("ray_serve_deployment_replica_healthy", "ray_serve_deployment_status"):
        assert f'"{name.removeprefix("ray_")}"' in source, name
    assert (DeploymentStatus.DEPLOY_FAILED.to_numeric(), DeploymentStatus.UNHEALTHY.to_numeric()) == (1, 2)
    # The autoscaler exports with prometheus_client, under its own names.
    autoscaler = {c._name: c._labelnames for c in AutoscalerPrometheusMetrics(session_name="s").registry
                  ._collector_to_names}
    for name in ("autoscaler_active_nodes", "autoscaler_pending_nodes"):
        assert "NodeType" in autoscaler[name], name
    assert set(OTHER_METRICS) == {"up", "ray_serve_num_http_requests_total", "ray_serve_deployment_replica_healthy",
                                  "ray_serve_deployment_status", "autoscaler_active_nodes", "autoscaler_pending_nodes"}


def test_the_dashboard_is_well_formed():
    dashboard = _dashboard()
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert grid["x"] + grid["w"] <= 24 and not mine & cells, panel["title"]
        cells |= mine
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(set(refs)) == len(refs) and (panel["type"] == "row") != bool(refs), panel["title"]
    exprs = " ".join(_dashboard_exprs(dashboard))
    assert "ray_vllm_" not in exprs and "ray_moe_cluster_" not in exprs


def test_the_readme_names_what_a_scraper_sees():
    readme = (MONITORING / "README.md").read_text()
    for text in ("`ray_io_cluster`", "`engine`", "`WorkerId`", "vllm:time_to_first_token_seconds_bucket",
                 "ray_vllm_time_to_first_token_seconds_bucket", "moe_cluster_expert_tokens_total"):
        assert text in readme, text
    for name in OTHER_METRICS:
        assert f"`{name}`" in readme, name


# -- built with kubectl ----------------------------------------------------------------------------------------------
@pytest.mark.e2e  # runs kubectl
def test_monitoring_kustomization_builds():
    import kubernetes_validate

    docs = kustomize(MONITORING)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("ConfigMap", "moe-cluster-dashboard"), ("PodMonitor", "moe-cluster"), ("PodMonitor", "moe-cluster-head"),
        ("PrometheusRule", "moe-cluster")]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    kubernetes_validate.validate(cm, "1.32.0", strict=True)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["moe-cluster-dashboard.json"]) == _dashboard()
    for monitor in (d for d in docs if d["kind"] == "PodMonitor"):
        assert monitor == _pod_monitor(monitor["metadata"]["name"])


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    expressions = selector.get("matchExpressions", [])
    assert all(e["operator"] == "In" for e in expressions), expressions
    return (selector.get("matchLabels", {}).items() <= labels.items()
            and all(labels.get(e["key"]) in e["values"] for e in expressions))


def _pods(rayservice: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, pod template) of each Ray node group."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"]["template"])] + [
        (group["groupName"], group["template"]) for group in cluster.get("workerGroupSpecs", [])]


def _admitted(policies: list[dict[str, Any]], labels: dict[str, str], port: dict[str, Any]) -> bool:
    """Whether the NetworkPolicies let a scraper from anywhere reach `port` (a container port) of a pod so labelled."""
    selecting = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _selects(p["spec"]["podSelector"], labels)]
    rules = [r for p in selecting for r in p["spec"].get("ingress", []) if not r.get("from")]
    return not selecting or any(
        "ports" not in r or any(p.get("port") in (port["name"], port["containerPort"]) for p in r["ports"])
        for r in rules)


@pytest.mark.e2e  # runs kubectl
@pytest.mark.parametrize("overlay", sorted(p.name for p in OVERLAYS.iterdir() if p.is_dir()))
def test_every_scraped_port_is_declared_and_open(overlay: str):
    """Each PodMonitor endpoint's port is declared on every pod the PodMonitor selects (Prometheus finds only
    declared ports), the autoscaler's only where Ray's autoscaler runs (elsewhere it would be a target always
    down), and the NetworkPolicies let Prometheus reach it."""
    docs = kustomize(OVERLAYS / overlay)
    (rayservice,) = [d for d in docs if d["kind"] == "RayService"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    autoscaling = rayservice["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling", False)
    wrong = []
    for monitor in (d for d in _docs("podmonitor.yaml") if d["kind"] == "PodMonitor"):
        selector = monitor["spec"]["selector"]
        selected = [(g, t) for g, t in _pods(rayservice) if _selects(selector, t["metadata"]["labels"])]
        assert selected, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            if endpoint["port"] == "as-metrics" and not autoscaling:
                declared = [g for g, t in selected for c in t["spec"]["containers"] for p in c.get("ports", [])
                            if p["name"] == "as-metrics"]
                wrong += [f"{g}: declares as-metrics without Ray's autoscaler" for g in declared]
                continue
            for group, template in selected:
                ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])
                         if p.get("name") == endpoint["port"]]
                if not ports:
                    wrong.append(f"{group}: no container port named {endpoint['port']}")
                elif not _admitted(policies, template["metadata"]["labels"], ports[0]):
                    wrong.append(f"{group}: no NetworkPolicy lets Prometheus reach {endpoint['port']}")
    assert wrong == []
