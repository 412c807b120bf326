"""A Triton server for tests: NVIDIA's NGC image in Docker where an engine is reachable
(serving the TorchScript tail with the libtorch backend), else the ``tritonserver`` binary of
the nvidia-pytriton wheel (serving the Python-backend tail). ``VEIL_TEST_TRITON=embedded`` or
``docker`` forces one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.fixtures_kafka import docker_reachable
from veil.detectors.base import SplitDetector
from workers.untrusted.triton_repo import TailManifest
from workers.untrusted.triton_server import EmbeddedTriton

NGC_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"


@dataclass(frozen=True)
class TritonTarget:
    url: str  # gRPC host:port
    model: str  # the model name to call
    kind: str  # "embedded" or "ngc-docker"


def _wants_docker() -> bool:
    choice = os.environ.get("VEIL_TEST_TRITON", "auto")
    if choice not in {"auto", "embedded", "docker"}:
        raise pytest.UsageError(f"VEIL_TEST_TRITON={choice!r}: use auto, embedded or docker")
    return choice == "docker" or (choice == "auto" and docker_reachable())


@contextlib.asynccontextmanager
async def triton_server(repository: Path) -> AsyncIterator[TritonTarget]:
    manifest = TailManifest.read(repository)
    if _wants_docker():
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        container = (
            DockerContainer(NGC_IMAGE)
            .with_volume_mapping(str(repository.resolve()), "/models", "ro")
            .with_command(
                "tritonserver --model-repository=/models --model-control-mode=explicit "
                + " ".join(f"--load-model={m}" for m in manifest.models("torchscript"))
            )
            .with_exposed_ports(8001)
        )
        with container:
            wait_for_logs(container, "Started GRPCInferenceService", timeout=600)
            host = container.get_container_host_ip()
            port = container.get_exposed_port(8001)
            yield TritonTarget(f"{host}:{port}", manifest.torchscript_model, "ngc-docker")
    else:
        async with EmbeddedTriton(repository) as server:
            yield TritonTarget(server.grpc_url, manifest.python_model, "embedded")


def tuned_tail_state(detector: SplitDetector) -> dict[str, torch.Tensor]:
    """The tail's conv kernels scaled by 1 + 0.1 N(0, 1) (seed 0): a tail that reads
    noticeably differently from the clean one and still finds the faces."""
    generator = torch.Generator().manual_seed(0)
    return {
        k: v * (1 + 0.1 * torch.randn(v.shape, generator=generator))
        if k.endswith("weight") and v.dim() == 4
        else v.clone()
        for k, v in detector.tail_state().items()
    }
