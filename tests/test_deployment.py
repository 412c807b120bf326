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
