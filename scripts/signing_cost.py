"""What signing costs per message: Ed25519 over a FaceBoxes 1920x1080 activation record.

Builds the record the edge publishes for one frame (``[128, 34, 60]`` float16, ~523 kB value,
stream ``lobby-cam-3``) and times, ``--repeats`` times each (median): the edge signing it
(:meth:`stream.signing.Signer.headers`), the detect worker verifying it
(:meth:`stream.signing.Verifier.verify`), and the sha256 of the value alone (most of both).
Then, where the FaceBoxes weights are found (``--weights``, else the reference data), the
FaceBoxes head on one 1920x1080 frame on this machine (``--device``: cuda when available) for
the ratio; ``--head-ms`` gives that time instead.

Usage: ``python scripts/signing_cost.py [--repeats 200] [--device cpu] [--head-ms 5.07]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stream.signing import ROLE_EDGE, Signer, TrustedKey, Verifier
from stream.wire import ActivationMessage, Envelope, FramePlacement, Provenance, encode

SHAPE = (128, 34, 60)  # FaceBoxes at 1920x1088


def activation_record() -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    rng = np.random.default_rng(0)
    msg = ActivationMessage(
        Envelope("lobby-cam-3", 41, 1.64, time.time()),
        Provenance("faceboxes", "9f" * 32, "fb-1920x1088-v1", 0.8),
        placement=FramePlacement(1920, 1080, 1.0, 1920, 1088),
        payload=rng.standard_normal(SHAPE).astype(np.float32),
    )
    return encode(msg)


def median_us(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def head_ms(weights: Path, device_name: str, repeats: int) -> tuple[float, str]:
    """Median FaceBoxes head time (preprocessing included) on one 1920x1080 frame."""
    import torch

    from veil.detectors.base import InputGeometry
    from veil.detectors.faceboxes import FaceBoxes

    device = torch.device(device_name)
    detector = FaceBoxes.from_checkpoint(weights).to(device).eval()
    geometry = InputGeometry(1920, 1088)
    frame = np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)

    def once() -> None:
        with torch.no_grad():
            x, _ = detector.preprocess([frame], geometry)
            detector.head(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return median_us(once, repeats) / 1000, name


def find_weights(given: str | None) -> Path | None:
    if given:
        return Path(given)
    from veil.data import data_root

    root = data_root(required=False)
    path = None if root is None else root / "faceboxes" / "FaceBoxesProd.pth"
    return path if path is not None and path.is_file() else None


def measure(repeats: int) -> dict[str, Any]:
    key, value, headers = activation_record()
    private = Ed25519PrivateKey.generate()
    signer = Signer(private, ROLE_EDGE)
    verifier = Verifier([TrustedKey(ROLE_EDGE, private.public_key())])
    signature = signer.headers(key, value, headers)
    signed = [*headers, *signature]
    verifier.verify(key, value, signed, ROLE_EDGE)
    sign_us = median_us(lambda: signer.headers(key, value, headers), repeats)
    verify_us = median_us(lambda: verifier.verify(key, value, signed, ROLE_EDGE), repeats)
    hash_us = median_us(lambda: hashlib.sha256(value).digest(), repeats)
    return {
        "value_bytes": len(value),
        "signature_header_bytes": sum(len(n) + len(v) for n, v in signature),
        "repeats": repeats,
        "sign_us": sign_us,
        "verify_us": verify_us,
        "sha256_us": hash_us,
        "sign_mb_s": len(value) / sign_us,
        "verify_mb_s": len(value) / verify_us,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--weights", help="FaceBoxesProd.pth (default: the reference data's)")
    parser.add_argument("--device", help="for the head: cpu | cuda (default: cuda if available)")
    parser.add_argument("--head-repeats", type=int, default=20)
    parser.add_argument("--head-ms", type=float, help="a measured head time instead of timing it")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    r = measure(args.repeats)
    print(
        f"activation record: value {r['value_bytes']:,} B, signature headers "
        f"{r['signature_header_bytes']} B; median of {r['repeats']}"
    )
    print(f"sign   {r['sign_us']:8.1f} us  ({r['sign_mb_s']:7.0f} MB/s)")
    print(f"verify {r['verify_us']:8.1f} us  ({r['verify_mb_s']:7.0f} MB/s)")
    print(f"  of which sha256 of the value {r['sha256_us']:.1f} us")
    head, where = args.head_ms, "given"
    weights = None if head is not None else find_weights(args.weights)
    if weights is not None:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        head, where = head_ms(weights, device, args.head_repeats)
    if head is not None:
        r.update(head_ms=head, head_device=where)
        print(
            f"FaceBoxes head, 1920x1080 frame ({where}): {head:.2f} ms; sign = "
            f"{100 * r['sign_us'] / 1000 / head:.1f}% of it, verify = "
            f"{100 * r['verify_us'] / 1000 / head:.1f}%"
        )
    else:
        print("FaceBoxes head: weights not found (--weights or --head-ms for the ratio)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
