"""The embedded broker's object store: a small S3-compatible server that tansu's S3 engine
stores its record batches, offsets and metadata in (a child process of :class:`EmbeddedBroker`,
in memory or over files in a ``data_dir``).

tansu 0.6 never deletes a record (it keeps ``retention.*`` topic configs without applying them,
and its DeleteRecords is unimplemented), so the store does: its trimmer deletes record batches
once every consumer group that has committed on their partition is past them (beyond
``keep_consumed_bytes``), batches past a topic's ``retention.ms`` / ``retention.bytes``, and the
oldest ones beyond ``max_stored_bytes`` (logged and counted as lost). It never deletes the
newest batch of a partition or anything of a compacted topic.

Run as ``python -m stream.objectstore --port-file PATH [options]``.
"""

from __future__ import annotations

import argparse
import bisect
import email.utils
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape as xml_escape

from veil.errors import ConfigError


def _is_size(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_store_settings(
    storage_engine: str | None,
    data_dir: Path | None,
    keep_consumed_bytes: int | None,
    max_stored_bytes: int | None,
    retention_s: float | None,
    trim_interval_s: float,
) -> None:
    if data_dir is not None and storage_engine is not None:
        raise ConfigError(
            f"data_dir needs the embedded object store (storage_engine=None), not {storage_engine}"
        )
    if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"data_dir {data_dir} exists and is not a directory")
    if max_stored_bytes is not None and not _is_size(max_stored_bytes, MIN_MAX_STORED_BYTES):
        raise ConfigError(
            f"max_stored_bytes ({max_stored_bytes!r}) must be None or an int >= "
            f"{MIN_MAX_STORED_BYTES} (one record of the largest size)"
        )
    if keep_consumed_bytes is not None and not _is_size(keep_consumed_bytes, 0):
        raise ConfigError(
            f"keep_consumed_bytes ({keep_consumed_bytes!r}) must be None or an int >= 0"
        )
    if retention_s is not None and not (math.isfinite(retention_s) and retention_s > 0):
        raise ConfigError(f"retention_s ({retention_s!r}) must be None or a number > 0")
    if not (math.isfinite(trim_interval_s) and 0 < trim_interval_s <= 3600):
        raise ConfigError(f"trim_interval_s ({trim_interval_s!r}) must be > 0 and <= 3600")


STORE_BUCKET: Final = "veil"
DEFAULT_MAX_STORED_BYTES: Final = 1024**3
DEFAULT_KEEP_CONSUMED_BYTES: Final = 64 * 1024**2
MIN_MAX_STORED_BYTES: Final = 1024 * 1024  # one record of the producers' max.request.size
_STORE_PAGE: Final = 1000  # keys per ListObjectsV2 page, as S3
_S3_NS: Final = "http://s3.amazonaws.com/doc/2006-03-01/"
# Kafka RecordBatch v2: baseOffset int64, batchLength int32, partitionLeaderEpoch int32,
# magic int8, crc uint32, attributes int16, then lastOffsetDelta int32.
_LAST_OFFSET_DELTA_AT: Final = 23
_BATCH_KEY: Final = re.compile(
    r"^clusters/([^/]+)/topics/([^/]+)/partitions/(\d+)/records/(\d{20})\.batch$"
)
_OFFSET_KEY: Final = re.compile(
    r"^clusters/([^/]+)/groups/consumers/(.+)/offsets/([^/]+)/partitions/(\d+)\.json$"
)
_META_KEY: Final = re.compile(r"^clusters/([^/]+)/meta\.json$")

_Partition = tuple[str, str, int]  # cluster, topic, partition


@dataclass(frozen=True)
class StoreStats:
    """What the embedded object store holds and has deleted (cumulative since it started).

    ``trimmed_*``: batches every consumer group that had committed on their partition was
    past, deleted beyond ``keep_consumed_bytes`` (lossless). ``expired_*``: batches past a
    topic's ``retention.ms`` / ``retention.bytes`` or the broker's ``retention_s``.
    ``capped_*``: the oldest batches, dropped because the records held exceeded
    ``max_stored_bytes``. ``lost_records``: records of expired or capped batches that some
    consumer group had not committed yet, or that no group had committed on.
    """

    objects: int
    stored_bytes: int
    record_batches: int
    record_bytes: int
    trimmed_batches: int
    trimmed_bytes: int
    expired_batches: int
    expired_bytes: int
    capped_batches: int
    capped_bytes: int
    lost_records: int
    requests: int
    trim_passes: int


@dataclass
class _Blob:
    size: int
    etag: str
    mtime: float
    records: int  # offsets a record batch spans (0 for other objects)
    data: bytes | None  # the bytes, in memory mode; None when they are in a file
    listing: str = ""  # its <Contents> element, made once


class _S3Error(Exception):
    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message = status, code, message


def _iso8601(t: float) -> str:
    millis = int(t * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{millis:03d}Z"


def _batch_records(head: bytes) -> int:
    if len(head) < _LAST_OFFSET_DELTA_AT + 4:
        return 1
    (delta,) = struct.unpack_from(">i", head, _LAST_OFFSET_DELTA_AT)
    return max(1, int(delta) + 1)


class _ObjectStore:
    """Objects by key, in memory or as files under ``root``; S3's conditional writes."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.lock = threading.Lock()
        self._blobs: dict[str, _Blob] = {}
        self._keys: list[str] = []  # sorted, for prefix listings
        self._token = os.urandom(4).hex()  # etags of this process never repeat older ones
        self._serial = itertools.count(1)
        self._last_mtime = 0.0
        self.bytes = 0
        if root is not None:
            self._load(root)

    # The object files live under root/objects, writes go through root/tmp.
    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / "objects" / key

    def _load(self, root: Path) -> None:
        shutil.rmtree(root / "tmp", ignore_errors=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        objects = root / "objects"
        objects.mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in objects.rglob("*") if p.is_file()):
            key = path.relative_to(objects).as_posix()
            stat = path.stat()
            records = 0
            if _BATCH_KEY.match(key):
                with path.open("rb") as fh:
                    records = _batch_records(fh.read(_LAST_OFFSET_DELTA_AT + 4))
            self._insert(key, stat.st_size, stat.st_mtime, records, None)
            self._last_mtime = max(self._last_mtime, stat.st_mtime)

    def _etag(self) -> str:
        return f'"{self._token}-{next(self._serial):x}"'

    def _insert(self, key: str, size: int, mtime: float, records: int, data: bytes | None) -> _Blob:
        etag = self._etag()
        blob = _Blob(size, etag, mtime, records, data)
        blob.listing = (
            f"<Contents><Key>{xml_escape(key)}</Key><LastModified>{_iso8601(mtime)}"
            f"</LastModified><ETag>{xml_escape(etag)}</ETag><Size>{size}</Size>"
            "<StorageClass>STANDARD</StorageClass></Contents>"
        )
        old = self._blobs.get(key)
        if old is None:
            bisect.insort(self._keys, key)
        else:
            self.bytes -= old.size
        self._blobs[key] = blob
        self.bytes += size
        return blob

    def _now(self) -> float:
        # Strictly increasing: tansu takes the newest batch by LastModified (ListOffsets).
        self._last_mtime = max(time.time(), self._last_mtime + 0.001)
        return self._last_mtime

    @staticmethod
    def check_key(key: str) -> None:
        parts = key.split("/")
        if not key or "\0" in key or any(p in {"", ".", ".."} for p in parts):
            raise _S3Error(400, "InvalidArgument", f"unsupported key {key!r}")

    def put(self, key: str, body: bytes, if_match: str | None, if_none_match: str | None) -> str:
        records = _batch_records(body) if _BATCH_KEY.match(key) else 0
        tmp: Path | None = None
        if self.root is not None:
            tmp = self.root / "tmp" / f"{next(self._serial)}-{os.getpid()}"
            tmp.write_bytes(body)
        try:
            with self.lock:
                current = self._blobs.get(key)
                if if_none_match == "*" and current is not None:
                    raise _S3Error(412, "PreconditionFailed", key)
                if if_match is not None:
                    if current is None:
                        raise _S3Error(404, "NoSuchKey", key)
                    if current.etag != if_match:
                        raise _S3Error(412, "PreconditionFailed", key)
                if tmp is not None:
                    path = self._path(key)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, path)
                    tmp = None
                    return self._insert(key, len(body), self._now(), records, None).etag
                return self._insert(key, len(body), self._now(), records, body).etag
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def get(self, key: str) -> tuple[_Blob, bytes]:
        with self.lock:
            blob = self._blobs.get(key)
            if blob is None:
                raise _S3Error(404, "NoSuchKey", key)
            if blob.data is not None:
                return blob, blob.data
            fh = self._path(key).open("rb")  # an open file outlives a replace or unlink
        with fh:
            return blob, fh.read()

    def head(self, key: str) -> _Blob:
        with self.lock:
            blob = self._blobs.get(key)
        if blob is None:
            raise _S3Error(404, "NoSuchKey", key)
        return blob

    def delete(self, key: str) -> int:
        """Remove ``key`` (no error if absent); the bytes it freed. Call with the lock held."""
        blob = self._blobs.pop(key, None)
        if blob is None:
            return 0
        del self._keys[bisect.bisect_left(self._keys, key)]
        self.bytes -= blob.size
        if blob.data is None:
            self._path(key).unlink(missing_ok=True)
        return blob.size

    def listing(
        self, prefix: str, after: str, delimiter: str, max_keys: int
    ) -> tuple[list[str], list[str], str | None]:
        """One ListObjectsV2 page: <Contents> elements, common prefixes, next token."""
        contents: list[str] = []
        prefixes: list[str] = []
        last = ""
        with self.lock:
            i = (
                bisect.bisect_right(self._keys, after)
                if after >= prefix
                else bisect.bisect_left(self._keys, prefix)
            )
            while i < len(self._keys):
                key = self._keys[i]
                if not key.startswith(prefix):
                    break
                if len(contents) + len(prefixes) >= max_keys:
                    return contents, prefixes, last
                i += 1
                if delimiter:
                    cut = key.find(delimiter, len(prefix))
                    if cut >= 0:
                        common = key[: cut + len(delimiter)]
                        prefixes.append(common)
                        last = common + "\U0010ffff"  # skip the rest of this prefix
                        i = bisect.bisect_right(self._keys, last)
                        continue
                contents.append(self._blobs[key].listing)
                last = key
        return contents, prefixes, None

    def snapshot(self) -> list[tuple[str, _Blob]]:
        with self.lock:
            return [(k, self._blobs[k]) for k in self._keys]


class _Trimmer:
    """Deletes record batches: consumed ones beyond a soft limit, expired ones, and the oldest
    beyond a hard cap."""

    def __init__(
        self,
        store: _ObjectStore,
        *,
        keep_consumed_bytes: int | None,
        max_stored_bytes: int | None,
        retention_s: float | None,
    ) -> None:
        self.store = store
        self.keep_consumed_bytes = keep_consumed_bytes
        self.max_stored_bytes = max_stored_bytes
        self.retention_s = retention_s
        self.counts = dict.fromkeys(
            (
                "trimmed_batches",
                "trimmed_bytes",
                "expired_batches",
                "expired_bytes",
                "capped_batches",
                "capped_bytes",
                "lost_records",
                "trim_passes",
            ),
            0,
        )

    def _json(self, key: str) -> Any:
        try:
            return json.loads(self.store.get(key)[1])
        except (_S3Error, OSError, ValueError):
            return None

    def _topic_configs(self, meta_keys: list[str]) -> dict[tuple[str, str], dict[str, str]]:
        configs: dict[tuple[str, str], dict[str, str]] = {}
        for key in meta_keys:
            cluster = _META_KEY.match(key)
            meta = self._json(key)
            if cluster is None or not isinstance(meta, dict):
                continue
            for name, topic in (meta.get("topics") or {}).items():
                entries = ((topic or {}).get("topic") or {}).get("configs") or []
                configs[(cluster.group(1), str(name))] = {
                    str(e.get("name")): str(e.get("value")) for e in entries if isinstance(e, dict)
                }
        return configs

    def _scan(
        self,
    ) -> tuple[dict[_Partition, list[tuple[int, str, _Blob]]], dict[_Partition, int], list[str]]:
        batches: dict[_Partition, list[tuple[int, str, _Blob]]] = {}
        floors: dict[_Partition, int] = {}  # the lowest offset a consumer group committed
        meta_keys: list[str] = []
        for key, blob in self.store.snapshot():
            if m := _BATCH_KEY.match(key):
                tp = (m.group(1), m.group(2), int(m.group(3)))
                batches.setdefault(tp, []).append((int(m.group(4)), key, blob))
            elif m := _OFFSET_KEY.match(key):
                committed = self._json(key)
                if isinstance(committed, dict) and isinstance(committed.get("offset"), int):
                    tp = (m.group(1), m.group(3), int(m.group(4)))
                    floors[tp] = min(floors.get(tp, committed["offset"]), committed["offset"])
            elif _META_KEY.match(key):
                meta_keys.append(key)
        return batches, floors, meta_keys

    def run_once(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        batches, floors, meta_keys = self._scan()
        configs = self._topic_configs(meta_keys)
        victims: dict[str, tuple[str, int]] = {}  # key -> why (trimmed, expired, capped), lost
        consumed: list[tuple[float, str, _Blob]] = []  # every group that committed is past it
        kept: list[tuple[float, str, _Blob, int]] = []  # mtime, key, blob, records unconsumed
        for tp, listed in batches.items():
            config = configs.get(tp[:2], {})
            policy = config.get("cleanup.policy", "delete")
            if "compact" in policy and "delete" not in policy:
                continue  # compacted topics keep every record (tansu does not compact)
            self._sort_partition(listed, floors.get(tp), config, now, (victims, consumed, kept))
        self._cap(victims, consumed, kept)
        self._delete(victims)

    def _sort_partition(
        self,
        listed: list[tuple[int, str, _Blob]],
        floor: int | None,
        config: dict[str, str],
        now: float,
        into: tuple[
            dict[str, tuple[str, int]],
            list[tuple[float, str, _Blob]],
            list[tuple[float, str, _Blob, int]],
        ],
    ) -> None:
        """One partition's batches into expired victims, consumed and kept ones. Newest first:
        the newest batch stays (as Kafka keeps the active segment), since tansu takes a
        partition's earliest and latest offsets from the batches it holds."""
        victims, consumed, kept = into
        retention_ms = _config_number(config, "retention.ms")
        retention_s = self.retention_s if retention_ms is None else retention_ms / 1000
        retention_bytes = _config_number(config, "retention.bytes")
        held = 0
        for rank, (offset, key, blob) in enumerate(sorted(listed, reverse=True)):
            end = offset + blob.records
            unconsumed = end - offset if floor is None else max(0, end - max(offset, floor))
            if rank > 0 and (
                (retention_s is not None and blob.mtime < now - retention_s)
                or (retention_bytes is not None and held + blob.size > retention_bytes)
            ):
                victims[key] = ("expired", unconsumed)
                continue
            held += blob.size
            if rank > 0 and floor is not None and unconsumed == 0:
                consumed.append((blob.mtime, key, blob))
            else:
                kept.append((blob.mtime, key, blob, unconsumed))

    def _cap(
        self,
        victims: dict[str, tuple[str, int]],
        consumed: list[tuple[float, str, _Blob]],
        kept: list[tuple[float, str, _Blob, int]],
    ) -> None:
        """Consumed batches go first (oldest first): beyond keep_consumed_bytes, and beyond
        max_stored_bytes whatever keep_consumed_bytes says; then, oldest first, the others."""
        total = sum(b.size for _, _, b in consumed) + sum(b.size for _, _, b, _ in kept)
        consumed.sort(key=lambda c: c[0])
        limits = [x for x in (self.keep_consumed_bytes, self.max_stored_bytes) if x is not None]
        while consumed and limits and total > min(limits):
            _mtime, key, blob = consumed.pop(0)
            victims[key] = ("trimmed", 0)
            total -= blob.size
        if self.max_stored_bytes is not None and total > self.max_stored_bytes:
            for _mtime, key, blob, unconsumed in sorted(kept, key=lambda k: k[0]):
                if total <= self.max_stored_bytes:
                    break
                victims[key] = ("capped", unconsumed)
                total -= blob.size

    def _delete(self, victims: dict[str, tuple[str, int]]) -> None:
        deleted: dict[str, list[int]] = {}
        with self.store.lock:
            for key, (why, lost) in victims.items():
                freed = self.store.delete(key)
                if freed:
                    self.counts[f"{why}_batches"] += 1
                    self.counts[f"{why}_bytes"] += freed
                    self.counts["lost_records"] += lost
                    deleted.setdefault(why, []).append(freed)
        self.counts["trim_passes"] += 1
        for why in ("expired", "capped"):
            if why in deleted:
                print(
                    f"veil-store: {why} {len(deleted[why])} record batches "
                    f"({sum(deleted[why])} bytes); {self.counts['lost_records']} records "
                    "deleted before every consumer group had committed them, so far",
                    file=sys.stderr,
                    flush=True,
                )


def _config_number(config: dict[str, str], name: str) -> float | None:
    """A topic's numeric config; None when unset, negative (Kafka's "no limit") or malformed."""
    try:
        value = float(config[name])
    except (KeyError, ValueError):
        return None
    return None if value < 0 else value


class _S3Handler(BaseHTTPRequestHandler):
    """The S3 calls tansu's object_store client makes: PUT (conditional), GET, HEAD, DELETE,
    ListObjectsV2 and multi-object delete. No authentication: it listens on loopback only."""

    protocol_version = "HTTP/1.1"
    server: _StoreServer
    body = b""

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, error: _S3Error) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><Error>'
            f"<Code>{error.code}</Code><Message>{xml_escape(error.message)}</Message></Error>"
        )
        self._reply(error.status, body.encode(), {"Content-Type": "application/xml"})

    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        url = urlsplit(self.path)
        bucket, _, key = url.path.lstrip("/").partition("/")
        return bucket, unquote(key), parse_qs(url.query, keep_blank_values=True)

    def _read_body(self) -> bytes:
        if self.command not in {"PUT", "POST"}:
            return b""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # what follows on this connection is unknown
            raise _S3Error(411, "MissingContentLength")
        return self.rfile.read(int(length))

    def _serve(self) -> None:
        self.server.requests += 1
        bucket, key, query = self._target()
        try:
            self.body = self._read_body()
            if bucket == "_veil" and key == "stats" and self.command == "GET":
                body = json.dumps(self.server.stats()).encode()
                self._reply(200, body, {"Content-Type": "application/json"})
            elif self.command == "PUT" and key:
                self._put(key, query)
            elif self.command in {"GET", "HEAD"} and key:
                self._get(key)
            elif self.command == "GET":
                self._list(bucket, query)
            elif self.command == "DELETE" and key:
                with self.server.store.lock:
                    self.server.store.delete(key)
                self._reply(204)
            elif self.command == "POST" and "delete" in query:
                self._delete_many()
            else:
                raise _S3Error(501, "NotImplemented", f"{self.command} {self.path}")
        except _S3Error as error:
            self._error(error)
        except (OSError, ValueError) as exc:  # a disk or request problem: the client retries
            print(f"veil-store: {self.command} {self.path} failed: {exc!r}", file=sys.stderr)
            self._error(_S3Error(500, "InternalError", repr(exc)))

    do_GET = do_HEAD = do_PUT = do_DELETE = do_POST = _serve

    def _put(self, key: str, query: dict[str, list[str]]) -> None:
        if "x-amz-copy-source" in self.headers or "uploadId" in query or "partNumber" in query:
            raise _S3Error(501, "NotImplemented", "copy and multipart uploads")
        self.server.store.check_key(key)
        etag = self.server.store.put(
            key, self.body, self.headers.get("If-Match"), self.headers.get("If-None-Match")
        )
        self._reply(200, headers={"ETag": etag})

    def _get(self, key: str) -> None:
        store = self.server.store
        blob, data = (store.head(key), b"") if self.command == "HEAD" else store.get(key)
        headers = {
            "ETag": blob.etag,
            "Last-Modified": email.utils.formatdate(blob.mtime, usegmt=True),
            "Content-Type": "application/octet-stream",
        }
        if_none_match = self.headers.get("If-None-Match")
        if if_none_match is not None and if_none_match in {blob.etag, "*"}:
            self.send_response(304)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            return
        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match not in {blob.etag, "*"}:
            raise _S3Error(412, "PreconditionFailed", key)
        wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if wanted is None or self.command == "HEAD":
            if self.command == "HEAD":
                self.send_response(200)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(blob.size))
                self.end_headers()
                return
            self._reply(200, data, headers)
            return
        first, last = wanted.groups()
        start = int(first) if first else max(0, blob.size - int(last or 0))
        stop = min(blob.size, int(last) + 1) if first and last else blob.size
        if start >= blob.size or start >= stop:
            raise _S3Error(416, "InvalidRange", self.headers.get("Range", ""))
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{blob.size}"
        self._reply(206, data[start:stop], headers)

    def _list(self, bucket: str, query: dict[str, list[str]]) -> None:
        def one(name: str, default: str = "") -> str:
            return query.get(name, [default])[0]

        prefix = one("prefix")
        after = one("continuation-token") or one("start-after")
        max_keys = min(_STORE_PAGE, max(1, int(one("max-keys", str(_STORE_PAGE)))))
        contents, prefixes, token = self.server.store.listing(
            prefix, after, one("delimiter"), max_keys
        )
        parts = [
            f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{_S3_NS}">',
            f"<Name>{xml_escape(bucket)}</Name><Prefix>{xml_escape(prefix)}</Prefix>",
            f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>",
            f"<IsTruncated>{'true' if token is not None else 'false'}</IsTruncated>",
        ]
        if token is not None:
            parts.append(f"<NextContinuationToken>{xml_escape(token)}</NextContinuationToken>")
        parts.extend(contents)
        parts.extend(
            f"<CommonPrefixes><Prefix>{xml_escape(p)}</Prefix></CommonPrefixes>" for p in prefixes
        )
        parts.append("</ListBucketResult>")
        self._reply(200, "".join(parts).encode(), {"Content-Type": "application/xml"})

    def _delete_many(self) -> None:
        try:
            root = ElementTree.fromstring(self.body)
        except ElementTree.ParseError as exc:
            raise _S3Error(400, "MalformedXML", str(exc)) from exc
        keys = [e.text or "" for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Key"]
        with self.server.store.lock:
            for key in keys:
                self.server.store.delete(key)
        deleted = "".join(f"<Deleted><Key>{xml_escape(k)}</Key></Deleted>" for k in keys)
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="{_S3_NS}">{deleted}'
            "</DeleteResult>"
        )
        self._reply(200, body.encode(), {"Content-Type": "application/xml"})


class _StoreServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, store: _ObjectStore, trimmer: _Trimmer) -> None:
        super().__init__((host, 0), _S3Handler)
        self.store = store
        self.trimmer = trimmer
        self.requests = 0

    def stats(self) -> dict[str, int]:
        batches = [b for k, b in self.store.snapshot() if _BATCH_KEY.match(k)]
        return {
            "objects": len(self.store.snapshot()),
            "stored_bytes": self.store.bytes,
            "record_batches": len(batches),
            "record_bytes": sum(b.size for b in batches),
            "requests": self.requests,
            **self.trimmer.counts,
        }


def _store_main(argv: Sequence[str]) -> int:
    """``python -m stream.broker object-store ...``: the object store, until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m stream.broker object-store")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--max-stored-bytes", type=int)
    parser.add_argument("--retention-s", type=float)
    parser.add_argument("--trim-interval-s", type=float, default=1.0)
    parser.add_argument("--keep-consumed-bytes", type=int)
    args = parser.parse_args(argv)
    store = _ObjectStore(args.data_dir)
    trimmer = _Trimmer(
        store,
        keep_consumed_bytes=args.keep_consumed_bytes,
        max_stored_bytes=args.max_stored_bytes,
        retention_s=args.retention_s,
    )
    server = _StoreServer(args.host, store, trimmer)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())

    def trim_forever() -> None:
        while True:
            time.sleep(args.trim_interval_s)
            try:
                trimmer.run_once()
            except Exception as exc:  # keep serving; say why trimming failed
                print(f"veil-store: trim pass failed: {exc!r}", file=sys.stderr, flush=True)

    threading.Thread(target=trim_forever, name="veil-store-trim", daemon=True).start()
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    where = args.data_dir or "memory"
    print(f"veil-store: serving S3 on {args.host}:{server.server_address[1]} ({where})", flush=True)
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(_store_main(sys.argv[1:]))
