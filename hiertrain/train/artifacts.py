"""Built segments as content-addressed artifacts, so a machine without the gradient builder trains.

Only onnxruntime-training (x86-64) can *build* a segment's graphs; once lowered
(:mod:`hiertrain.train.lowering`) any onnxruntime *runs* them. A runner (a Raspberry Pi) gets them:

- from a directory written by ``hiertrain segments build --model M --out DIR`` and copied by hand
  (``[runtime] segments = "DIR"``): a ``manifest.json`` lists every segment's key and the SHA-256
  of each of its files;
- or over MQTT from a builder tier: it sends a ``segreq`` message naming the segment and its key,
  the builder builds (or finds) it and answers with a ``segment`` message carrying the files and
  their SHA-256. Either way the runner verifies every file against its hash and that the key is
  the one it computed from its own model before it caches the artifact under that key.

A segment's key hashes the model's forward graph of the range, the kind and the lowering version
(:func:`hiertrain.train.segments.key`), so builder and runner agree on it whatever onnx/onnxruntime
versions each has, and a runner never uses graphs built for a different model definition.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import queue
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from hiertrain.train import segments
from hiertrain.errors import ArtifactError, PlanError, ProtocolError
from hiertrain.train.models import ModelSpec
from hiertrain.net.validate import ARTIFACT_FILES as FILES
from hiertrain.net.wire import MAX_INT, Message

log = logging.getLogger("hiertrain.train.artifacts")
FORMAT = "hiertrain-segments/1"
MANIFEST = "manifest.json"
REQUEST, REPLY = "segreq", "segment"


@dataclass(frozen=True)
class Request:
    """Which segment a runner wants, and the key it computed for it."""

    model: str
    first: int
    last: int
    kind: str
    input_grad: bool
    key: str

    @classmethod
    def of(cls, spec: ModelSpec, first: int, last: int, kind: str, input_grad: bool) -> "Request":
        return cls(spec.name, first, last, kind, input_grad, segments.key(spec, first, last, kind, input_grad))

    def meta(self) -> dict:
        return {"model": self.model, "first": self.first, "last": self.last, "seg_kind": self.kind,
                "input_grad": self.input_grad, "key": self.key}

    @classmethod
    def from_meta(cls, meta: dict) -> "Request":
        try:
            req = cls(meta["model"], meta["first"], meta["last"], meta["seg_kind"], meta["input_grad"], meta["key"])
        except KeyError as exc:
            raise ProtocolError(f"segment request lacks {exc}") from None
        if not (isinstance(req.model, str) and isinstance(req.key, str) and req.kind in ("body", "head")
                and isinstance(req.input_grad, bool)
                and all(type(v) is int and 0 <= v <= 100_000 for v in (req.first, req.last))):
            raise ProtocolError(f"malformed segment request {meta!r}")
        return req


def digests(path: Path) -> dict[str, str]:
    """SHA-256 of every artifact file in a built segment's directory."""
    return {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in FILES if (path / f).is_file()}


def _verify(key: str, files: dict[str, bytes], hashes: dict[str, str]) -> None:
    if "meta.json" not in files or not ({"step.onnx"} <= set(files) or {"forward.onnx", "backward.onnx"} <= set(files)):
        raise ArtifactError(f"segment {key}: incomplete artifact ({sorted(files)})")
    for name, data in files.items():
        if name not in FILES:
            raise ArtifactError(f"segment {key}: unexpected file {name!r}")
        if hashlib.sha256(data).hexdigest() != hashes.get(name):
            raise ArtifactError(f"segment {key}: {name} does not match its SHA-256; refusing it")


def install(root: Path, key: str, files: dict[str, bytes], hashes: dict[str, str]) -> Path:
    """Verify ``files`` against ``hashes`` and store them under ``root/key`` (atomically)."""
    _verify(key, files, hashes)
    final = root / key
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    try:
        os.rename(tmp, final)
    except OSError:  # already there (another process): keep that one
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------ a directory of artifacts

def all_requests(spec: ModelSpec) -> Iterable[tuple[int, int, str, bool]]:
    """Every segment any schedule of ``spec`` can ask for: (first, last, kind, input_grad)."""
    n = spec.n_units
    for first in range(1, n + 2):
        yield first, n, "head", first > 1
    for first in range(1, n + 1):
        for last in range(first, n + 1):
            yield first, last, "body", first > 1


def build_dir(spec: ModelSpec, out: Path, *, root: Optional[Path] = None) -> dict:
    """Build every segment of ``spec`` into ``out`` with a manifest; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for first, last, kind, dx in all_requests(spec):
        built = segments.build(spec, first, last, kind=kind, input_grad=dx, root=root or out)
        key = segments.key(spec, first, last, kind, dx)
        target = out / key
        if built.path != target:
            shutil.copytree(built.path, target, dirs_exist_ok=True)
        entries[key] = {"first": first, "last": last, "kind": kind, "input_grad": dx, "files": digests(target)}
    manifest = {"format": FORMAT, "model": spec.name, "lowering": segments.lowering.VERSION, "segments": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def from_dir(directory: Path, key: str, root: Path) -> Optional[Path]:
    """Copy segment ``key`` from an artifact directory into ``root`` (verified); None if absent."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"segment directory {directory}: cannot read {MANIFEST}: {exc}") from None
    entry = manifest.get("segments", {}).get(key)
    if entry is None:
        return None
    files = {f: (directory / key / f).read_bytes() for f in entry["files"]}
    return install(root, key, files, entry["files"])


def provider(directory: Optional[Path], fetch: Optional["Fetcher"]):
    """A :class:`~hiertrain.train.runtime.Runtime` provider: the artifact directory first, then a builder."""
    def get(spec: ModelSpec, first: int, last: int, kind: str, input_grad: bool, root: Path) -> Path:
        req = Request.of(spec, first, last, kind, input_grad)
        if directory is not None:
            found = from_dir(directory, req.key, root)
            if found is not None:
                return found
        if fetch is None:
            raise ArtifactError(f"segment {req.key} is not in {directory} and this onnxruntime cannot build it")
        return fetch(req, root)
    return get


# ------------------------------------------------------------------ over MQTT

def reply_tensors(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    files = {f: np.frombuffer((path / f).read_bytes(), np.uint8) for f in FILES if (path / f).is_file()}
    return files, [f"{f}:{h}" for f, h in digests(path).items()]


class Server:
    """A builder tier's thread: answers every ``segreq`` addressed to it with the built segment."""

    def __init__(self, transport, spec: ModelSpec, *, root: Optional[Path] = None) -> None:
        self.transport, self.spec, self.root = transport, spec, root
        self._thread = threading.Thread(target=self._serve, name="hiertrain-segment-server", daemon=True)
        self.served = 0

    def start(self) -> "Server":
        self._thread.start()
        return self

    def _serve(self) -> None:
        q = self.transport.service[REQUEST]
        while (msg := q.get()) is not None:
            try:
                req = Request.from_meta(dict(msg.meta))
                if req.model != self.spec.name:
                    raise ArtifactError(f"this job trains {self.spec.name}, not {req.model}")
                mine = segments.key(self.spec, req.first, req.last, req.kind, req.input_grad)
                if mine != req.key:
                    raise ArtifactError(f"key {req.key} differs from the builder's {mine}: different model definitions "
                                        f"(hiertrain versions?)")
                built = segments.build(self.spec, req.first, req.last, kind=req.kind, input_grad=req.input_grad,
                                       root=self.root)
                tensors, hashes = reply_tensors(built.path)
                meta = {"key": req.key, "sha256": hashes}
            except (ArtifactError, ProtocolError, PlanError) as exc:  # refused, saying why
                log.warning("%s: refused a segment request from %s: %s", self.transport.account, msg.sender, exc)
                tensors, meta = {}, {"error": str(exc)}
            except Exception as exc:  # never let one request stop the server
                log.warning("%s: segment request from %s failed: %s", self.transport.account, msg.sender, exc)
                tensors, meta = {}, {"error": f"{type(exc).__name__}: {exc}"}
            self.served += 1
            self.transport.send(Message(REPLY, self.transport.job, self.transport.account, msg.sender, msg.iteration,
                                        0, tensors, 0, meta))
            log.info("%s: sent segment %s to %s", self.transport.account, meta.get("key", "(refused)"), msg.sender)


class Fetcher:
    """A runner's way to a segment it cannot build: ask a builder tier and verify what comes back."""

    _ids = itertools.count()

    def __init__(self, transport, builders: Callable[[], list[str]], *, timeout: float) -> None:
        self.transport, self.builders, self.timeout = transport, builders, timeout

    def __call__(self, req: Request, root: Path) -> Path:
        deadline = time.monotonic() + self.timeout
        while not (candidates := self.builders()):
            if time.monotonic() > deadline:
                raise ArtifactError(f"{self.transport.account}: this onnxruntime cannot build segments and no builder "
                                f"tier (onnxruntime-training) is online; copy `hiertrain segments build` output "
                                f"here and set [runtime] segments")
            time.sleep(0.1)
        builder = candidates[0]
        rid = (int(time.time() * 1000) * 1024 + next(self._ids)) % MAX_INT
        t0 = time.perf_counter()
        self.transport.send(Message(REQUEST, self.transport.job, self.transport.account, builder, rid, 0, {}, 0,
                                    req.meta()))
        q = self.transport.service[REPLY]
        while True:
            left = deadline - time.monotonic()
            try:
                msg = q.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise ArtifactError(f"{self.transport.account}: no segment {req.key} from {builder} within "
                                f"{self.timeout:g} s") from None
            if msg.iteration != rid or msg.sender != builder:
                continue  # an answer to an earlier, abandoned request
            break
        if "error" in msg.meta:
            raise ArtifactError(f"{builder} refused segment {req.key}: {msg.meta['error']}")
        if msg.meta.get("key") != req.key:
            raise ArtifactError(f"{builder} answered with segment {msg.meta.get('key')!r}, not {req.key}")
        hashes = dict(h.split(":", 1) for h in msg.meta.get("sha256", []) if isinstance(h, str) and ":" in h)
        path = install(root, req.key, {n: a.tobytes() for n, a in msg.tensors.items()}, hashes)
        log.info("%s: fetched segment %s from %s (%.0f KB, %.2f s), SHA-256 verified", self.transport.account,
                 req.key, builder, sum(a.nbytes for a in msg.tensors.values()) / 1e3, time.perf_counter() - t0)
        return path


class Supply:
    """Where a service's segments come from, the same for every tier and fleet member: built here
    (onnxruntime-training) and served to those who cannot build, or, with plain onnxruntime, from
    ``[runtime] segments`` and then from a builder over MQTT (one whose status says ``builder``;
    the edge, next to the broker, first)."""

    def __init__(self, transport, *, directory: Optional[Path], timeout: float) -> None:
        self.transport, self.directory = transport, directory
        self.builds = segments.can_build()
        if self.builds:
            transport.status_extra["builder"] = True  # before the transport's first status
            self.provider = None
        else:
            self.provider = provider(directory, Fetcher(transport, self.builders, timeout=timeout))

    def builders(self) -> list[str]:
        return sorted(self.transport.builders(), key=lambda account: account != "edge")

    @contextmanager
    def serving(self, spec: ModelSpec, root: Optional[Path]) -> Iterator[None]:
        """While connected: a builder answers segment requests; a runner says where it gets them."""
        import onnxruntime

        me, version = self.transport.account, onnxruntime.__version__
        if not self.builds:
            source = f"[runtime] segments ({self.directory}), then " if self.directory else ""
            print(f"{me}: onnxruntime {version} (no gradient builder): segments from {source}a builder over MQTT, "
                  f"verified and cached in {root or segments.cache_dir()}", flush=True)
            yield
            return
        Server(self.transport, spec, root=root).start()
        print(f"{me}: onnxruntime-training {version}: builds its segments, and serves them to those who cannot",
              flush=True)
        try:
            yield
        finally:
            self.transport.service[REQUEST].put(None)
