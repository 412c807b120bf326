"""The deployment files say what the zones may reach: parsed and checked, not applied (no
cluster or Docker engine here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "compose"


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((COMPOSE / "k8s" / "zones.yaml").read_text()) if d]


def _egress_targets(policy: dict[str, Any]) -> set[tuple[str, int]]:
    """(what, port) pairs a policy lets its pods reach."""
    found = set()
    for rule in policy["spec"].get("egress", []):
        for peer in rule.get("to", []):
            labels = peer.get("podSelector", {}).get("matchLabels", {})
            zone = peer.get("namespaceSelector", {}).get("matchLabels", {})
            what = labels.get("app.kubernetes.io/name") or zone.get("kubernetes.io/metadata.name")
            for port in rule.get("ports", [{"port": 0}]):
                found.add((str(what), int(port["port"])))
    return found


def test_each_zone_denies_by_default_and_reaches_only_what_its_role_needs() -> None:
    docs = _docs()
    policies = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d
        for d in docs
        if d["kind"] == "NetworkPolicy"
    }
    for zone in ("veil-trusted", "veil-transit", "veil-outside"):
        deny = policies[(zone, "default-deny")]["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    edge = policies[("veil-trusted", "edge-to-broker-only")]
    assert _egress_targets(edge) == {("kafka", 9093), ("kube-system", 53)}
    detect = policies[("veil-outside", "detect-to-broker-and-triton")]
    assert _egress_targets(detect) == {("kafka", 9093), ("triton", 8001), ("kube-system", 53)}
    assert policies[("veil-outside", "triton-from-detect-only")]["spec"]["egress"] == []


def test_only_the_trusted_zone_runs_the_image_with_a_head() -> None:
    images = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["image"]
        for d in _docs()
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    assert images["veil-edge"] == "veil:0.1.0"
    assert images["veil-detect"] == "veil-outside:0.1.0"
    assert images["kafka"].startswith("apache/kafka:4.")
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert compose["x-veil-outside"]["build"]["args"] == {"VEIL_EXTRAS": ""}
    assert compose["services"]["detect"]["image"] == "veil-outside:0.1.0"


def test_compose_speaks_tls_between_the_services() -> None:
    from veil.config import load_config

    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    kafka = compose["services"]["kafka"]["environment"]
    assert kafka["KAFKA_LISTENERS"] == "SSL://:9092,CONTROLLER://:9093"  # no plaintext clients
    assert kafka["KAFKA_ADVERTISED_LISTENERS"] == "SSL://kafka:9092"
    assert "--grpc-use-ssl=true" in compose["services"]["triton"]["command"]
    configs = COMPOSE.parent / "configs"
    edge, detect = (load_config(configs / f"{n}.yaml", env={}) for n in ("edge", "detect"))
    assert edge.kafka.security.protocol == detect.kafka.security.protocol == "SSL"
    assert detect.triton.tls.enabled and detect.triton.tls.ca_file == "/certs/ca.crt"


def test_prometheus_scrapes_each_zone_over_its_own_network_and_grafana_is_provisioned() -> None:
    import json
    import re

    from veil import observability

    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    services, networks = compose["services"], compose["networks"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert set(prometheus["networks"]) >= {"monitoring-trusted", "monitoring-outside"}
    assert "monitoring-trusted" in services["edge"]["networks"]
    assert "monitoring-outside" not in services["edge"]["networks"]  # zones stay apart
    assert "monitoring-trusted" not in services["detect"]["networks"]
    assert networks["monitoring-trusted"]["internal"] and networks["monitoring-outside"]["internal"]
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]  # the host's loopback only
    for role in ("edge", "detect"):
        env = services[role]["environment"]
        assert env["VEIL__OBSERVABILITY__HTTP_PORT"] == "9100"
    scrape = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert jobs["veil-edge"]["static_configs"][0]["targets"] == ["edge:9100"]
    assert jobs["veil-detect"]["dns_sd_configs"][0] == {
        "names": ["detect"],
        "type": "A",
        "port": 9100,
    }
    mounted = {v.split(":")[0] for v in prometheus["volumes"] + grafana["volumes"]}
    for path in mounted - {"prometheus-data", "grafana-data"}:
        assert (COMPOSE / path).exists(), path
    provisioning = COMPOSE / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "veil.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "veil.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    # Every metric a panel plots is one veil exports (histograms through their _bucket).
    exported = {
        name
        for metric in vars(observability).values()
        if hasattr(metric, "_name") and hasattr(metric, "describe")
        for name in (metric._name, f"{metric._name}_total", f"{metric._name}_bucket")
    }
    used = {m for e in exprs for m in re.findall(r"\bveil_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for what in ("source up", "frames per second", "dropped", "published"):
        assert what in titles, what
