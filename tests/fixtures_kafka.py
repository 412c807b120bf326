"""A Kafka broker for the whole test session: Apache Kafka in Docker where an engine is
reachable, else the embedded tansu broker.

``VEIL_TEST_BROKER=embedded`` (or ``docker``) forces one. Import the fixture into a test module
with ``from tests.fixtures_kafka import kafka_target``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stream.broker import EmbeddedBroker


@dataclass(frozen=True)
class KafkaTarget:
    bootstrap_servers: str
    kind: str  # "tansu" or "apache-kafka"
    supports_idempotence: bool


def docker_reachable() -> bool:
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure to talk to an engine means: no Docker here
        return False


def _wants_docker() -> bool:
    choice = os.environ.get("VEIL_TEST_BROKER", "auto")
    if choice not in {"auto", "embedded", "docker"}:
        raise pytest.UsageError(f"VEIL_TEST_BROKER={choice!r}: use auto, embedded or docker")
    return choice == "docker" or (choice == "auto" and docker_reachable())


@pytest.fixture(scope="session")
def kafka_target() -> Iterator[KafkaTarget]:
    if _wants_docker():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as kafka:
            yield KafkaTarget(kafka.get_bootstrap_server(), "apache-kafka", True)
    else:
        with EmbeddedBroker() as broker:
            yield KafkaTarget(broker.bootstrap_servers, "tansu", False)
