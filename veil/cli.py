"""``veil`` command line. Each subcommand imports only what it needs, so ``veil --help`` and
the lightweight roles start fast."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import VeilError


def _detector(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from veil.detectors import load_detector

    weights = Path(args.weights) if getattr(args, "weights", None) else None
    return load_detector(args.model, weights, getattr(args, "device", "cpu"))


def _geometry(args: argparse.Namespace, detector):  # type: ignore[no-untyped-def]
    from veil.detectors.base import InputGeometry

    return InputGeometry.parse(args.geometry) if args.geometry else detector.default_geometry


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="retinaface", help="faceboxes | retinaface")
    p.add_argument("--weights", help="checkpoint path (FaceBoxes needs one; default: none)")
    p.add_argument(
        "--geometry", help="model input WxH; frames are letterboxed into it (default: the model's)"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from veil.calibrate import calibrate, config_for, list_images, video_frames
    from veil.errors import ConfigError

    detector = _detector(args)
    geometry = _geometry(args, detector)
    boxes = None
    images: list = []  # type: ignore[type-arg]
    if args.images:
        images = list(list_images(Path(args.images), args.max_images))
        source = f"images:{args.images}"
    elif args.video:
        images = list(video_frames(Path(args.video), every=args.every, limit=args.max_images))
        source = f"video:{args.video}"
    else:
        raise ConfigError("calibrate needs --images DIR or --video FILE (your own footage)")
    if args.task == "multibox":
        if not args.labels:
            raise ConfigError(
                "--task multibox needs --labels: a WIDER FACE folder with ground truth"
            )
        from veil.eval.widerface import load_widerface

        wider = load_widerface(Path(args.labels), args.max_images)
        images = [im.path for im in wider.images]
        boxes = [
            np.concatenate([im.gt_xywh[:, :2], im.gt_xywh[:, :2] + im.gt_xywh[:, 2:]], 1)[
                ~im.is_placeholder
            ].astype(np.float32)
            for im in wider.images
        ]
        source = f"widerface:{args.labels}"
    config = config_for(
        detector.name,
        alphas=tuple(args.alphas),
        geometry=geometry,
        task=args.task,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        sigma_max_ratio=args.sigma_max,
        task_weight=args.task_weight,
        initial_sigma_ratio=args.initial_sigma,
        leakage=args.leakage,
        tune_tail=not args.frozen_tail,
        tail_lr=args.tail_lr,
        adversary_weight=args.adversary_weight,
    )
    started = time.perf_counter()
    print(
        f"calibrating {detector.name} at {geometry} on {len(images)} images from {source}; "
        f"alphas {list(config.alphas)}; task loss {config.task}",
        flush=True,
    )
    calibrate(detector, images, Path(args.out), config, boxes=boxes, source=source)
    print(f"took {time.perf_counter() - started:.1f} s")
    return 0


def _detect_fn_for(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from veil.inference import make_detect_fn
    from veil.profiles import ProfileBank

    detector = _detector(args)
    geometry = _geometry(args, detector)
    profile = None
    if args.profile:
        profile = ProfileBank(Path(args.profile).parent).load_path(Path(args.profile))
    elif args.alpha is not None:
        profile = ProfileBank(Path(args.bank)).get(
            args.alpha, detector.name, detector.weights_id, geometry
        )
    if profile is not None and not args.geometry:
        geometry = type(geometry).parse(profile.meta.geometry)  # a profile fixes its geometry
    return detector, geometry, profile, make_detect_fn(detector, geometry, profile, seed=args.seed)


def _fddb_records(
    detector: Any, geometry: Any, profiles: dict[str, Any], results: dict[str, Any], draws: int
) -> list[dict[str, Any]]:
    return [
        {
            "benchmark": "fddb",
            "model": detector.name,
            "weights_id": detector.weights_id,
            "geometry": str(geometry),
            "alpha": p.alpha if p else 0.0,
            "profile_id": p.profile_id if p else "none",
            "noise_draws": draws if p else 0,
            "result": results[name].to_json(),
        }
        for name, p in profiles.items()
    ]


def cmd_eval_fddb(args: argparse.Namespace) -> int:
    from veil.eval.fddb import evaluate_fddb_many, load_fddb
    from veil.inference import HeadCache, make_detect_fn
    from veil.profiles import ProfileBank

    dataset = load_fddb(Path(args.dataset), max_images_per_fold=args.max_images_per_fold)
    if not args.all_alphas:
        detector, geometry, profile, detect = _detect_fn_for(args)
        repeats = args.draws if profile is not None else 1
        runs = {"": (detect, repeats)}
        profiles = {"": profile}
    else:
        # Clean and every profile of the bank in one pass: one image decode and one head per
        # batch serve them all (the head is frozen; only the noise and the tail differ).
        detector = _detector(args)
        geometry = _geometry(args, detector)
        cache = HeadCache()
        found = [
            p
            for p in ProfileBank(Path(args.bank)).profiles()
            if p.meta.model == detector.name and p.meta.geometry == str(geometry)
        ]
        profiles = {"clean": None} | {f"alpha {p.alpha:.2f}": p for p in found}
        runs = {
            name: (
                make_detect_fn(detector, geometry, p, seed=args.seed, head_cache=cache),
                1 if p is None else args.draws,
            )
            for name, p in profiles.items()
        }
    print(
        f"FDDB: {detector.name} at {geometry} (frames letterboxed into it); "
        + ", ".join(
            f"{name or 'run'}: "
            + (f"profile {p.profile_id}, {args.draws} noise draws" if p else "clean")
            for name, p in profiles.items()
        ),
        flush=True,
    )
    results = evaluate_fddb_many(runs, dataset, batch_size=args.batch_size)
    records = _fddb_records(detector, geometry, profiles, results, args.draws)
    if len(records) > 1:
        from veil.eval.table import fddb_table

        print(fddb_table(records))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = records[0] if len(records) == 1 else records
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


def cmd_eval_widerface(args: argparse.Namespace) -> int:
    from veil.eval.widerface import evaluate_widerface

    detector, geometry, profile, detect = _detect_fn_for(args)
    result = evaluate_widerface(
        detect, Path(args.dataset), batch_size=args.batch_size, max_images=args.max_images
    )
    if args.json:
        record = {
            "benchmark": "widerface",
            "model": detector.name,
            "geometry": str(geometry),
            "alpha": profile.alpha if profile else 0.0,
            "profile_id": profile.profile_id if profile else "none",
            "result": result.to_json(),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


def stream_ids(sources: Sequence[str]) -> list[str]:
    """Readable, unique stream ids for ``--source``: a file's stem, a camera URL's host and
    last path segment (``rtsp://10.0.0.5/live/ch1`` is ``10.0.0.5-ch1``)."""
    from urllib.parse import urlsplit

    ids: list[str] = []
    for source in sources:
        if "://" in source:
            parts = urlsplit(source)
            tail = parts.path.rstrip("/").rsplit("/", 1)[-1]
            base = "-".join(p for p in (parts.hostname or "camera", tail) if p)
        else:
            base = Path(source).stem
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "stream"
        sid, n = base, 1
        while sid in ids:
            n += 1
            sid = f"{base}-{n}"
        ids.append(sid)
    return ids


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from veil.config import StreamConfig, load_config
    from veil.observability import configure_logging

    config = load_config(args.config)
    if getattr(args, "bank", None):
        config = replace(config, profile_bank=args.bank)
    if getattr(args, "source", None):
        streams = tuple(
            StreamConfig(
                id=sid,
                source=src,
                policy="lossless" if "://" not in src else "realtime",
                alpha=args.alpha if args.alpha is not None else 0.8,
                allow_clean=args.alpha == 0,  # asked for on the trusted zone's own command line
                pace=not getattr(args, "no_pace", False),
            )
            for sid, src in zip(stream_ids(args.source), args.source, strict=True)
        )
        config = replace(config, streams=streams)
    elif getattr(args, "alpha", None) is not None:
        clean = args.alpha == 0  # asked for on the trusted zone's own command line
        config = replace(
            config,
            streams=tuple(
                replace(s, alpha=args.alpha, allow_clean=s.allow_clean or clean)
                for s in config.streams
            ),
        )
    configure_logging(config.observability.log_format, config.observability.log_level)
    return config


async def _until_stopped(name: str, watch: Callable[[], Awaitable[None]], say: str) -> None:
    """Serve a child server until SIGINT/SIGTERM; its death ends this with an error."""
    from stream.runtime import Supervisor, stop_on_signals

    supervisor = Supervisor(name)
    supervisor.add(name, watch, background=True)

    async def until_stop() -> None:
        await supervisor.stopping.wait()

    supervisor.add("serve", until_stop)
    print(say, flush=True)
    with stop_on_signals(supervisor):
        await supervisor.run()


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    from dataclasses import replace

    from veil.runner import demo_streams, run_pipeline

    config = _config(args)
    outputs = config.outputs
    if args.annotated_dir:
        outputs = replace(outputs, annotated_dir=args.annotated_dir)
    if args.jsonl:
        outputs = replace(outputs, jsonl=args.jsonl)
    if args.preview:
        outputs = replace(outputs, preview=True)
        if config.observability.http_port is None:  # a free port, printed at start
            config = replace(config, observability=replace(config.observability, http_port=0))
    config = replace(config, outputs=outputs)
    if not config.streams:
        config = replace(config, streams=demo_streams(args.alpha if args.alpha else 0.8))
        print(f"no --source given: using the demo clip {config.streams[0].source}", flush=True)
    summary = asyncio.run(run_pipeline(config, print_detections=not args.quiet))
    print("summary:")
    for line in summary.lines():
        print(f"  {line}")
    lost = summary.edge.frames_published - summary.tally.frames
    return 1 if lost or summary.edge.source_errors else 0


def cmd_export(args: argparse.Namespace) -> int:
    from veil.detectors.base import InputGeometry
    from veil.profiles import ProfileBank
    from workers.untrusted.triton_repo import TailManifest, export_model_repository

    detector = _detector(args)
    geometry = _geometry(args, detector)
    if args.bank and not args.geometry:
        # The bank's profiles fix the geometry (when they agree; else the mismatch is named).
        geometries = {p.meta.geometry for p in ProfileBank(Path(args.bank)).profiles()}
        if len(geometries) == 1:
            geometry = InputGeometry.parse(geometries.pop())
    out = export_model_repository(
        detector,
        geometry,
        Path(args.out),
        bank=Path(args.bank) if args.bank else None,
        max_batch_size=args.max_batch,
        device_kind="gpu" if args.gpu else "cpu",
    )
    manifest = TailManifest.read(out)
    tuned = len(manifest.models("python")) - 1
    print(
        f"Triton model repository for the {detector.name} tail at {geometry}: {out} (clean tail "
        f"and {tuned} profile tail(s); {len(manifest.profile_routes()) - 1} profile(s) served)"
    )
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    import asyncio

    from stream.broker import EmbeddedBroker
    from stream.kafka import ensure_topics
    from veil.errors import ServiceError
    from veil.preflight import check_port_free

    if args.port is not None:
        check_port_free("127.0.0.1", args.port, "--port")

    async def serve() -> None:
        data_dir = Path(args.data_dir) if args.data_dir else None
        async with EmbeddedBroker(port=args.port, data_dir=data_dir) as broker:
            try:
                await ensure_topics(broker.bootstrap_servers)
            except ServiceError:
                if not broker.running:  # say what died, not only that a request failed
                    await broker.watch()
                raise
            await _until_stopped(
                "broker",
                broker.watch,
                f"embedded Kafka-compatible broker (tansu) on {broker.bootstrap_servers}",
            )

    asyncio.run(serve())
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    import asyncio

    from veil.preflight import check_port_free
    from workers.untrusted.triton_server import EmbeddedTriton

    if args.grpc_port is not None:
        check_port_free("127.0.0.1", args.grpc_port, "--grpc-port")

    async def serve() -> None:
        async with EmbeddedTriton(Path(args.repository), grpc_port=args.grpc_port) as server:
            await _until_stopped(
                "triton", server.watch, f"tritonserver on {server.grpc_url} serving {server.models}"
            )

    asyncio.run(serve())
    return 0


def cmd_edge(args: argparse.Namespace) -> int:
    import asyncio

    from veil.preflight import check_edge
    from veil.runner import build_obfuscator, serve

    config = _config(args)
    check_edge(config)
    obfuscator = build_obfuscator(config)
    print(f"edge worker: {len(config.streams)} streams on {obfuscator.device}", flush=True)
    graph = asyncio.run(serve(config, frozenset({"edge"}), obfuscator=obfuscator))
    assert graph.edge is not None
    stats = graph.edge.stats
    print(
        f"edge: {stats.frames_in} frames read, {stats.frames_published} published, "
        f"{stats.publish_retries} publish retries",
        flush=True,
    )
    for stream_id, error in stats.source_errors.items():
        print(f"veil: stream {stream_id} failed: {error}", file=sys.stderr)
    return 1 if stats.source_errors else 0


def cmd_detect(args: argparse.Namespace) -> int:
    import asyncio

    from veil.preflight import check_http_port
    from veil.runner import serve

    config = _config(args)
    check_http_port(config)
    graph = asyncio.run(serve(config, frozenset({"detect"})))
    print(f"detect: {graph.detect.stats}", flush=True)
    return 0


def _kafka_security(args: argparse.Namespace) -> Any:
    """kafka.security of ``--config`` (TLS, SASL), or None for plaintext."""
    if not args.config:
        return None
    from veil.config import load_config

    return load_config(args.config).kafka.security


def _operator_keys(args: argparse.Namespace) -> tuple[Any, Any]:
    """(the operator's signer, a verifier of the edges' answers), each None when not given."""
    from stream.signing import (
        ROLE_EDGE,
        ROLE_OPERATOR,
        Signer,
        TrustedKey,
        Verifier,
        load_public_key,
    )

    key = getattr(args, "key", None)
    signer = Signer.from_file(key, ROLE_OPERATOR) if key else None
    edge = args.edge_key
    verifier = Verifier([TrustedKey(ROLE_EDGE, load_public_key(edge))]) if edge else None
    return signer, verifier


def cmd_alpha_set(args: argparse.Namespace) -> int:
    import asyncio

    from stream.kafka import TopicNames
    from veil.alpha import describe, set_alpha
    from veil.profiles import check_alpha

    alpha = check_alpha(args.value)
    signer, verifier = _operator_keys(args)
    status = asyncio.run(
        set_alpha(
            args.bootstrap,
            args.stream,
            alpha,
            TopicNames(args.topic_prefix),
            args.timeout,
            signer=signer,
            verifier=verifier,
            security=_kafka_security(args),
        )
    )
    print(describe(status))
    if status.outcome != "applied":
        print(
            f"veil: stream {args.stream}: alpha {alpha} refused: {status.reason}", file=sys.stderr
        )
        return 1
    return 0


def cmd_alpha_list(args: argparse.Namespace) -> int:
    import asyncio

    from stream.kafka import TopicNames
    from veil.alpha import describe, read_status

    _, verifier = _operator_keys(args)
    table = asyncio.run(
        read_status(
            args.bootstrap,
            TopicNames(args.topic_prefix),
            verifier=verifier,
            security=_kafka_security(args),
        )
    )
    for status in sorted(table.values(), key=lambda s: s.stream_id):
        print(describe(status))
    if not table:
        print("no stream announced yet")
    return 0


def _detection_filter(args: argparse.Namespace) -> Any:
    from veil.detection_feed import DetectionFilter, parse_time

    return DetectionFilter(
        frozenset(args.stream or ()),
        parse_time(args.since, "--since") if args.since else None,
        parse_time(args.until, "--until") if args.until else None,
        args.min_score,
    )


def _detect_verifier(args: argparse.Namespace) -> Any:
    """Who must have signed the detections: --detect-key, else --config's signing section."""
    from stream.signing import ROLE_DETECT, TrustedKey, Verifier, keys_for, load_public_key

    if args.detect_key:
        return Verifier([TrustedKey(ROLE_DETECT, load_public_key(args.detect_key))])
    if not args.config:
        return None
    from veil.config import load_config

    return keys_for(load_config(args.config).signing, "sink").verifier


def cmd_detections_tail(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from stream.kafka import TopicNames
    from veil.detection_feed import tail_detections
    from veil.observability import configure_logging
    from veil.outputs import detection_record

    configure_logging()  # warnings (an unverified record) on stderr: stdout is JSON lines
    where = _detection_filter(args)
    verifier = _detect_verifier(args)

    def out(msg: Any) -> None:
        print(json.dumps(detection_record(msg)), flush=True)

    async def tail() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await tail_detections(
            args.bootstrap,
            out,
            topics=TopicNames(args.topic_prefix),
            where=where,
            follow=args.follow,
            stop=stop,
            verifier=verifier,
            security=_kafka_security(args),
            timeout_s=args.timeout,
        )

    asyncio.run(tail())
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    from stream.signing import SIGNS, init_keys

    folder = Path(args.dir)
    for pair in init_keys(folder):
        signs = SIGNS[pair.role]
        print(f"{pair.role:8} key {pair.key_id}: {pair.private} (signs {signs}), {pair.public}")
    print(
        f"keep each private key with its role only; set signing.private_key (and the public keys "
        f"each role verifies with) in its configuration, or private_key: {folder} for veil run"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from veil.bench import BenchSettings, run_bench, save
    from veil.data import data_root, reference_weights
    from veil.detectors.base import InputGeometry

    video = Path(args.video) if args.video else data_root() / "videos" / "street_1080p.mp4"  # type: ignore[operator]
    weights = Path(args.weights) if args.weights else reference_weights(args.model)
    settings = BenchSettings(
        video=video,
        model=args.model,
        weights=weights,
        geometry=InputGeometry.parse(args.geometry) if args.geometry else None,
        alpha=args.alpha,
        device=args.device,
        micro_frames=args.frames,
        bank=Path(args.bank) if args.bank else None,
        realtime_s=args.realtime_seconds,
    )
    result = run_bench(settings)
    save(result, Path(args.json))
    print(f"results: {args.json}")
    return 0


def _accuracy_from(path: str) -> tuple[dict[float, float], float | None]:
    records = json.loads(Path(path).read_text())
    records = records if isinstance(records, list) else [records]
    accuracy: dict[float, float] = {}
    clean_ap: float | None = None
    for r in records:
        if r["alpha"] == 0.0:
            clean_ap = float(r["result"]["mean_ap"])
        else:
            accuracy[float(r["alpha"])] = float(r["result"]["mean_ap"])
    return accuracy, clean_ap


def _privacy_fddb(args: argparse.Namespace) -> dict[str, Any]:
    """The default data: the attacker's WIDER FACE images, FDDB victims and distractors."""
    from veil.calibrate import list_images
    from veil.data import data_root
    from veil.eval.fddb import load_fddb

    root = Path(".") if args.train_images and args.eval_fddb else data_root()
    assert root is not None  # data_root() raises when the reference data is missing
    wider = root / "widerface" / "WIDER_val" / "images"
    train_dir = Path(args.train_images) if args.train_images else wider
    fddb_dir = Path(args.eval_fddb) if args.eval_fddb else root / "fddb"
    per_fold = args.max_eval_per_fold + args.distractors_per_fold
    fddb = load_fddb(fddb_dir, max_images_per_fold=per_fold)
    victims = [im for f in fddb.folds for im in f.images[: args.max_eval_per_fold]]
    others = [im for f in fddb.folds for im in f.images[args.max_eval_per_fold :]]
    return {
        "train_images": list_images(train_dir, args.max_train),
        "eval_images": [im.path for im in victims],
        "eval_gt_boxes": [im.boxes.astype(np.float32) for im in victims],
        "distractor_images": [im.path for im in others],
        "distractor_boxes": [im.boxes.astype(np.float32) for im in others],
        "train_source": str(train_dir),
        "eval_source": str(fddb_dir),
        "data_source": f"fddb:{fddb_dir}",
    }


def _privacy_footage(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """The operator's footage: sampled, split by time; clean detections stand in for faces."""
    from veil.privacy.footage import sample_footage, split_by_time

    path = Path(args.footage)
    samples = sample_footage(path, args.footage_frames, cache)
    split = split_by_time(samples, str(path), args.footage_train_share)
    print(split.describe(), flush=True)
    return {
        "train_images": split.train,
        "eval_images": split.eval,
        "eval_gt_boxes": None,
        "train_source": f"{path} (first part)",
        "eval_source": f"{path} (later part)",
        "data_source": f"footage:{path}",
    }


def cmd_privacy(args: argparse.Namespace) -> int:
    import tempfile

    from veil.privacy.report import attach_accuracy, privacy_report

    if args.attach_accuracy_only:
        if not args.accuracy:
            from veil.errors import ConfigError

            raise ConfigError("--attach-accuracy-only needs --accuracy JSON")
        acc, clean = _accuracy_from(args.accuracy)
        report = attach_accuracy(Path(args.out), acc, clean)
        print(f"accuracy added to {Path(args.out) / 'report.html'} ({len(report.rows)} rows)")
        return 0
    detector = _detector(args)
    accuracy: dict[float, float] | None = None
    clean_ap: float | None = None
    if args.accuracy:
        accuracy, clean_ap = _accuracy_from(args.accuracy)
    with tempfile.TemporaryDirectory(prefix="veil-footage-") as tmp:
        data = _privacy_footage(args, Path(tmp)) if args.footage else _privacy_fddb(args)
        report = privacy_report(
            detector,
            Path(args.bank),
            accuracy=accuracy,
            clean_ap=clean_ap,
            out_dir=Path(args.out),
            epochs=args.epochs,
            image_size=args.image_size,
            rmle_images=args.rmle_images,
            rmle_steps=args.rmle_steps,
            linkage_epochs=args.linkage_epochs,
            seed=args.seed,
            deployed_alpha=args.deployed_alpha,
            record_leakage=not args.no_record_leakage,
            **data,
        )
    for line in report.verdict:
        print(line["text"])
    print(f"privacy report: {Path(args.out) / 'report.html'} ({len(report.rows)} rows)")
    return 0


def _streams_call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    from veil.http_client import call

    return call(args.url, method, path, body, args.timeout)


def _stream_line(s: dict[str, Any]) -> str:
    error = f"; {s['error']}" if s.get("error") else ""
    return (
        f"{s['id']}: {s['state']}, alpha {s['alpha']} (profile {s['profile_id']}), "
        f"{s['fps']} fps, frames in {s['frames_in']} dropped {s['frames_dropped']} published "
        f"{s['frames_published']}, reconnects {s['reconnects']}, {s['source']}{error}"
    )


def cmd_streams(args: argparse.Namespace) -> int:
    """``veil streams list|add|remove|set-alpha|reload-bank`` against an edge's HTTP API."""
    what = args.streams_command
    if what == "list":
        for stream in _streams_call(args, "GET", "/v1/streams")["streams"]:
            print(_stream_line(stream))
    elif what == "add":
        body = {"id": args.id, "source": args.source, "alpha": args.alpha, "policy": args.policy}
        body.update(loop=args.loop, allow_clean=args.allow_clean, min_alpha=args.min_alpha)
        print(_stream_line(_streams_call(args, "POST", "/v1/streams", body)))
    elif what == "remove":
        answer = _streams_call(args, "DELETE", f"/v1/streams/{args.id}")
        done = "removed" if answer["removed"] else "removing (still publishing its last frames)"
        print(f"{args.id}: {done}: {answer['stream']['frames_published']} frames published")
    elif what == "set-alpha":
        status = _streams_call(args, "PUT", f"/v1/streams/{args.id}/alpha", {"alpha": args.value})
        print(f"{args.id}: alpha {status['alpha']} (profile {status['profile_id']}): applied")
    else:
        answer = _streams_call(args, "POST", "/v1/bank/reload")
        print(f"profile bank {answer['bank']}: alphas {answer['alphas']}, new {answer['added']}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; a flag's reads "off", an unset one "none"
    (options whose help says what their default means are left as they are)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0:
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


Subparsers = Any  # argparse's _SubParsersAction, private


def _command(sub: Subparsers, name: str, text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=text, description=text, formatter_class=_HelpFormatter
    )
    return parser


def _group(sub: Subparsers, name: str, text: str, dest: str) -> Subparsers:
    return _command(sub, name, text).add_subparsers(dest=dest, required=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("veil")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_calibrate(sub: Subparsers) -> None:
    from veil.calibrate import DEFAULT_ALPHAS

    p = _command(sub, "calibrate", "learn noise profiles (one per alpha), detector frozen")
    _add_model_args(p)
    p.add_argument("--images", help="folder of calibration images (your cameras' stills)")
    p.add_argument("--video", help="a video file of your footage (every --every-th frame)")
    p.add_argument("--every", type=int, default=5, help="take every N-th frame of --video")
    p.add_argument("--labels", help="WIDER FACE folder with ground truth, for --task multibox")
    p.add_argument("--task", default="distill", choices=["distill", "multibox"], help="task loss")
    p.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), help="alphas")
    p.add_argument("--max-images", type=int, default=200, help="calibration images at most")
    p.add_argument("--epochs", type=int, help="default: 8 (retinaface-stage1: 6)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument(
        "--task-weight", type=float, help="task vs noise scale (default: 5 faceboxes, 30 others)"
    )
    p.add_argument(
        "--initial-sigma",
        type=float,
        help="x activation std (default: 1 faceboxes, 0.5 retinaface, else 0.25)",
    )
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of the noise")
    p.add_argument("--sigma-max", type=float, default=10.0, help="upper noise bound, x act. std")
    p.add_argument(
        "--leakage",
        default="channel",
        choices=["channel", "log_sigma"],
        help="noise term: Gaussian-channel bound or -log mean sigma",
    )
    p.add_argument(
        "--frozen-tail", action="store_true", help="learn the noise only (no tail per profile)"
    )
    p.add_argument("--tail-lr", type=float, default=1e-4, help="learning rate of the tail")
    p.add_argument(
        "--adversary-weight",
        type=float,
        default=0.0,
        help="train against an inversion decoder learning alongside, at this weight (0: off)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="profile bank folder")
    p.set_defaults(func=cmd_calibrate)


def _add_eval(sub: Subparsers) -> None:
    ev = _group(sub, "eval", "accuracy benchmarks", "benchmark")
    for name, func in (("fddb", cmd_eval_fddb), ("widerface", cmd_eval_widerface)):
        e = _command(ev, name, f"{name.upper()} average precision")
        _add_model_args(e)
        e.add_argument("--dataset", required=True, help="benchmark folder")
        e.add_argument("--alpha", type=float, help="use the bank's profile for this alpha")
        e.add_argument("--bank", default="runs/bank", help="profile bank folder (with --alpha)")
        e.add_argument("--profile", help="a profile .safetensors file")
        e.add_argument("--noisy", action="store_true", help="(implied by --alpha/--profile)")
        e.add_argument("--draws", type=int, default=3, help="noise draws averaged (noisy runs)")
        e.add_argument("--seed", type=int, default=None, help="fix the noise (reproducibility)")
        e.add_argument("--batch-size", type=int, default=8, help="images per batch")
        e.add_argument("--json", help="write machine-readable results here")
        if name == "fddb":
            e.add_argument("--max-images-per-fold", type=int, help="images per fold at most")
            e.add_argument(
                "--all-alphas",
                action="store_true",
                help="clean and every profile of --bank in one pass (the README table)",
            )
        else:
            e.add_argument("--max-images", type=int, help="images at most")
        e.set_defaults(func=func)


def _add_run(sub: Subparsers) -> None:
    p = _command(sub, "run", "everything on embedded defaults (broker, Triton, workers)")
    p.add_argument(
        "--config", help="YAML configuration (default: the embedded defaults of configs/)"
    )
    p.add_argument(
        "--source", action="append", help="file or URL; repeatable (default: the demo clip)"
    )
    p.add_argument(
        "--no-pace",
        action="store_true",
        help="read --source files flat out, not at their own frame rate",
    )
    p.add_argument("--alpha", type=float, help="alpha for every stream (default: 0.8)")
    p.add_argument(
        "--bank",
        help="profile bank folder (profile_bank; default: the cache's, calibrated on the footage)",
    )
    p.add_argument("--jsonl", help="append detections here as JSON lines, each as it arrives")
    p.add_argument("--annotated-dir", help="write annotated H.264 MP4s per stream here")
    p.add_argument(
        "--preview",
        action="store_true",
        help="serve a live MJPEG preview of each annotated stream on the HTTP port "
        "(observability.http_port; a free one when unset)",
    )
    p.add_argument("--quiet", action="store_true", help="do not print each detection")
    p.set_defaults(func=cmd_run)


def _add_export(sub: Subparsers) -> None:
    p = _command(sub, "export", "write a Triton model repository for the tail")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="the repository folder")
    p.add_argument("--max-batch", type=int, default=16, help="Triton max_batch_size")
    p.add_argument("--gpu", action="store_true", help="KIND_GPU instances")
    p.add_argument(
        "--bank", help="profile bank: also serve its profiles, each tuned tail as its own model"
    )
    p.set_defaults(func=cmd_export)


def _add_servers(sub: Subparsers) -> None:
    p = _command(sub, "broker", "run the embedded Kafka-compatible broker")
    p.add_argument("--port", type=int, help="default: a free loopback port")
    p.add_argument(
        "--data-dir",
        help="keep topics, records and committed offsets in files here (survive a restart); "
        "default: in memory, lost when the broker stops",
    )
    p.set_defaults(func=cmd_broker)

    p = _command(sub, "triton", "run the bundled tritonserver on a model repository")
    p.add_argument("--repository", required=True, help="the folder `veil export --out` wrote")
    p.add_argument("--grpc-port", type=int, help="default: a free loopback port")
    p.set_defaults(func=cmd_triton)

    for name, func, text in (
        ("edge", cmd_edge, "trusted zone: sources -> head + noise -> Kafka"),
        ("detect", cmd_detect, "outside: Kafka -> Triton tail -> detections"),
    ):
        p = _command(sub, name, text)
        p.add_argument("--config", required=True, help="YAML configuration (see configs/)")
        p.add_argument("--alpha", type=float, help="override every stream's alpha")
        p.set_defaults(func=func)


def _add_privacy(sub: Subparsers) -> None:
    p = _command(sub, "privacy", "attack a profile bank; write the privacy report")
    _add_model_args(p)
    p.add_argument("--bank", required=True, help="profile bank folder")
    p.add_argument("--footage", help="your own footage (video file or folder of frames)")
    p.add_argument("--footage-frames", type=int, default=120, help="frames sampled from it")
    p.add_argument("--footage-train-share", type=float, default=0.6, help="attacker's part")
    p.add_argument("--train-images", help="the attacker's images (default: $VEIL_DATA WIDER)")
    p.add_argument("--eval-fddb", help="FDDB folder: victims + faces (default: $VEIL_DATA)")
    p.add_argument("--max-train", type=int, default=300, help="attacker's images at most")
    p.add_argument("--max-eval-per-fold", type=int, default=4, help="victims per FDDB fold")
    p.add_argument(
        "--distractors-per-fold", type=int, default=6, help="further FDDB images, gallery only"
    )
    p.add_argument("--accuracy", help="JSON of `veil eval fddb --all-alphas --json`")
    p.add_argument(
        "--attach-accuracy-only",
        action="store_true",
        help="add --accuracy to the report already in --out (no attacks are run)",
    )
    p.add_argument("--deployed-alpha", type=float, help="the alpha in service (marked)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of the trained attacks")
    p.add_argument("--image-size", type=int, default=256, help="attack image side, pixels")
    p.add_argument("--rmle-images", type=int, default=20, help="images the RMLE attack inverts")
    p.add_argument("--rmle-steps", type=int, default=60, help="RMLE optimisation steps")
    p.add_argument("--linkage-epochs", type=int, default=30, help="epochs of the linkage attack")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--no-record-leakage", action="store_true", help="leave the profiles' meta untouched"
    )
    p.add_argument("--out", default="runs/privacy", help="report folder")
    p.set_defaults(func=cmd_privacy)


def _add_bench(sub: Subparsers) -> None:
    p = _command(sub, "bench", "head+noise timings and pipeline throughput on a video")
    p.add_argument("--video", help="default: the 1080p clip of the reference data")
    p.add_argument("--model", default="faceboxes", help="faceboxes | retinaface")
    p.add_argument("--weights", help="default: the reference data's FaceBoxesProd.pth")
    p.add_argument("--geometry", help="default: the video's size rounded up to the stride")
    p.add_argument("--alpha", type=float, default=0.8, help="alpha of the noisy run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--frames", type=int, default=50, help="frames for the micro timings")
    p.add_argument("--bank", help="profile bank (default: calibrate one on the video, cached)")
    p.add_argument(
        "--realtime-seconds",
        type=float,
        default=120.0,
        help="length of the realtime run, latency per 20 s window (0: none)",
    )
    p.add_argument("--json", default="runs/bench.json", help="write the results here")
    p.set_defaults(func=cmd_bench)


def _add_kafka_reader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    p.add_argument("--topic-prefix", default="veil", help="topics <prefix>.control, .status, ...")
    p.add_argument("--config", help="YAML whose kafka.security says how to connect (TLS, SASL)")


def _add_keys_and_alpha(sub: Subparsers) -> None:
    keys = _group(sub, "keys", "signing keys of the Kafka records", "keys_command")
    p = _command(keys, "init", "write edge, detect and operator Ed25519 key pairs to DIR")
    p.add_argument("dir", help="folder for <role>.key (mode 0600) and <role>.pub; not overwritten")
    p.set_defaults(func=cmd_keys_init)

    alpha = _group(sub, "alpha", "change a stream's noise live", "alpha_command")
    p = _command(alpha, "set", "ask the trusted zone for a new alpha; wait for its answer")
    p.add_argument("stream", help="stream id")
    p.add_argument("value", type=float, help="the new alpha, in [0, 1]")
    _add_kafka_reader_args(p)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the answer")
    p.add_argument("--key", help="the operator's private key (veil keys init): signs the request")
    p.add_argument("--edge-key", help="the edge's public key: only answers it signed count")
    p.set_defaults(func=cmd_alpha_set)
    p = _command(alpha, "list", "each stream's alpha, profile, floor and last answer")
    _add_kafka_reader_args(p)
    p.add_argument("--edge-key", help="the edge's public key: only answers it signed count")
    p.set_defaults(func=cmd_alpha_list)


def _add_detections(sub: Subparsers) -> None:
    group = _group(sub, "detections", "read the detections topic", "detections_command")
    p = _command(group, "tail", "detections as JSON lines, filtered; to the end or --follow")
    _add_kafka_reader_args(p)
    p.add_argument("--stream", action="append", help="only this stream; repeatable (default: all)")
    p.add_argument("--since", help="captured at or after: unix seconds, ISO 8601, or ago (10m, 2h)")
    p.add_argument("--until", help="captured at or before (same forms as --since)")
    p.add_argument("--min-score", type=float, help="keep boxes scoring at least this")
    p.add_argument("--follow", action="store_true", help="keep reading new detections")
    p.add_argument(
        "--detect-key",
        help="the detect worker's public key: only detections it signed are shown "
        "(default: signing.detect_public_key of --config, else unverified)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to read to the end")
    p.set_defaults(func=cmd_detections_tail)


def _add_streams(sub: Subparsers) -> None:
    group = _group(
        sub, "streams", "manage a running edge's streams over its HTTP API", "streams_command"
    )
    parsers = {
        "list": _command(group, "list", "each stream's state, alpha, fps and counters"),
        "add": _command(group, "add", "add a stream while the edge runs"),
        "remove": _command(group, "remove", "stop a stream; what it decoded is still published"),
        "set-alpha": _command(group, "set-alpha", "ask the trusted zone for a new alpha"),
        "reload-bank": _command(group, "reload-bank", "read the profile bank again"),
    }
    for name, p in parsers.items():
        if name in ("add", "remove", "set-alpha"):
            p.add_argument("id", help="stream id")
        p.add_argument("--url", required=True, help="the edge's http://HOST:PORT (http_port)")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it")
        p.set_defaults(func=cmd_streams)
    add = parsers["add"]
    add.add_argument("source", help="file path or rtsp:// / http(s):// URL")
    add.add_argument("--alpha", type=float, default=0.8, help="a calibrated alpha")
    add.add_argument(
        "--policy", default="realtime", choices=["realtime", "lossless"], help="policy"
    )
    add.add_argument("--loop", action="store_true", help="start a file over at its end")
    add.add_argument("--min-alpha", type=float, help="floor (default: the weakest profile)")
    add.add_argument("--allow-clean", action="store_true", help="allow alpha 0 (no noise)")
    parsers["set-alpha"].add_argument("value", type=float, help="the new alpha, in [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veil",
        description="Confidential face detection on video: split model + noise.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"veil {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_calibrate(sub)
    _add_eval(sub)
    _add_run(sub)
    _add_export(sub)
    _add_servers(sub)
    _add_privacy(sub)
    _add_bench(sub)
    _add_keys_and_alpha(sub)
    _add_detections(sub)
    _add_streams(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from stream.runtime import keep_freed_memory

    keep_freed_memory()  # every role's tensors reuse the heap instead of page-faulting
    try:
        return int(args.func(args))
    except VeilError as exc:
        print(f"veil: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("veil: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
