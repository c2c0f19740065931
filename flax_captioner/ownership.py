"""An output's ownership: the lock that gives it to one run at a time, and the manifest that
says what made its rows.

- The lock, ``OUT.lock``. On a local disk an ``flock`` on that file, which the kernel drops
  when its process ends, however it ends; the file is removed on release (a run that locked
  a file removed meanwhile sees another inode at the path, and tries again). On an object
  store, lease objects ``OUT.lock/NNNNNNNN``, each created only if absent (S3
  ``If-None-Match: *``, GCS ``ifGenerationMatch=0``; fsspec's ``mode="create"``): the highest
  number holds the output until its lease expires. Its owner renews the lease on a thread; a
  run that finds it expired, or held by a process of its own host that is gone, creates the
  next number, so of two successors exactly one wins, and an owner that sees a higher number than its own has lost the output
  and stops. Leases compare wall clocks: hosts' clocks must agree to well within a lease.
- The manifest, ``OUT.manifest.json``, written before the first row: the tool's version, the
  format, the model's fingerprint and every choice that changes a row. An output with no
  manifest is not this tool's and is never modified, moved or deleted; a resume whose
  manifest differs is refused, naming what differs.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from flax_captioner import storage
from flax_captioner.errors import OutputError
from flax_captioner.sources import CheckedInputs
from flax_captioner.storage import StorageOptions
from flax_captioner.writers import check_writable, manifest_path, output_present

LOCK_SUFFIX = ".lock"
# An object-store lock's lease, renewed every third of it: a crashed run's output is free
# again this long after its last renewal.
LEASE_SECONDS = 120.0
# fsspec protocols whose mode="create" writes are exclusive on the server.
_EXCLUSIVE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "memory"})
# The fields of a manifest that must agree for a run to add rows to an output.
_COMPARED = ("version", "format", "model", "settings")

logger = logging.getLogger(__name__)


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "command": " ".join(sys.argv)[:200], "started": time.time()}


def _dead_here(record: Mapping[str, Any]) -> bool:
    """Whether a lease's owner ran on this host and its process is gone (killed, crashed):
    its lease need not run out. A reused process id only makes the lease wait."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False


def _describe_owner(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "its owner is starting"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"process {record.get('pid')} on {record.get('host')} since {started}"


@contextlib.contextmanager
def lock_output(output: str, storage_options: StorageOptions | None = None, *,
                lease_seconds: float = LEASE_SECONDS) -> Iterator[OutputLock]:
    """Holds ``output`` for this run; yields the lock (``check`` it between batches).

    Raises:
      OutputError: another run holds ``output`` (naming it), at once.
    """
    if storage.is_remote(output):
        fs, remote = storage.filesystem(output, storage_options)
        lock: OutputLock = (_LeaseLock(fs, remote, output, lease_seconds)
                            if storage.protocol(output) in _EXCLUSIVE_PROTOCOLS
                            else _Unlocked(output))
    else:
        check_writable(output)  # its folder's absence or permissions, in the writer's words
        lock = _FileLock(storage.local_path(output))
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def check_unlocked(output: str, storage_options: StorageOptions | None = None) -> None:
    """Fails fast, before a model loads, when another run holds ``output`` (the run itself
    takes the lock later, with ``lock_output``)."""
    with lock_output(output, storage_options):
        pass


class OutputLock:
    """What ``lock_output`` yields."""

    def acquire(self) -> None:
        """Takes the output, or raises ``OutputError`` naming its holder."""

    def check(self) -> None:
        """Raises ``OutputError`` when another run has taken the output over."""

    def release(self) -> None:
        """Gives the output back."""


class _Unlocked(OutputLock):
    """A store without exclusive writes: the run goes on unlocked, and says so."""

    def __init__(self, output: str):
        self.output = output

    def acquire(self) -> None:
        logger.warning("%s: this store has no exclusive writes, so the output is not locked: "
                       "do not start two runs on it", self.output)


class _FileLock(OutputLock):
    """``flock`` on ``OUT.lock``; the kernel releases it when the process ends."""

    def __init__(self, output: str):
        self.output = output
        self.path = output + LOCK_SUFFIX
        self._handle: Any = None

    def acquire(self) -> None:
        while True:
            try:
                handle = open(self.path, "a+", encoding="utf-8")
            except OSError as error:
                raise OutputError(f"{self.path}: cannot create the output's lock: "
                                  f"{error.strerror or error}") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                try:
                    record = json.loads(handle.read() or "null")
                except ValueError:
                    record = None
                handle.close()
                raise OutputError(f"{self.output}: another run is writing it "
                                  f"({_describe_owner(record)})",
                                  fix=("other_output",)) from None
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # its owner removed it between our open and our lock: again
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_owner()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # still locked: a waiting run sees a new inode and retries
        self._handle.close()
        self._handle = None


class _LeaseLock(OutputLock):
    """Numbered lease objects under ``OUT.lock/``; the highest holds the output."""

    def __init__(self, fs: Any, remote: str, output: str, lease_seconds: float):
        self.fs = fs
        self.output = output
        self.prefix = remote + LOCK_SUFFIX
        self.lease_seconds = lease_seconds
        self.name: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._record = _owner()

    def _leases(self) -> list[tuple[int, str]]:
        try:
            names = self.fs.ls(self.prefix, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        leases = []
        for name in names:
            number = name.rstrip("/").rsplit("/", 1)[-1]
            if number.isdigit():
                leases.append((int(number), name))
        return sorted(leases)

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(name))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign: treat as expired
            return {"expires": 0}

    def _payload(self) -> bytes:
        return json.dumps({**self._record,
                           "expires": time.time() + self.lease_seconds}).encode()

    def acquire(self) -> None:
        try:
            for _ in range(5):
                leases = self._leases()
                number = 1
                if leases:
                    number = leases[-1][0] + 1
                    record = self._read(leases[-1][1])
                    if record is None:
                        continue  # released meanwhile
                    if record.get("expires", 0) > time.time() and not _dead_here(record):
                        raise OutputError(f"{self.output}: another run is writing it "
                                          f"({_describe_owner(record)}; its lease ends in "
                                          f"{record['expires'] - time.time():.0f} s)",
                                          fix=("other_output",))
                name = f"{self.prefix}/{number:08d}"
                try:
                    self.fs.pipe_file(name, self._payload(), mode="create")
                except FileExistsError:
                    continue  # another run took this number first: look again
                self.name = name
                for _, stale in leases:  # expired leases of dead runs
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(stale)
                break
            else:
                raise OutputError(f"{self.output}: its lock kept changing hands; try again")
        except OutputError:
            raise
        except Exception as error:
            raise OutputError(f"{self.output}: cannot take the output's lock: "
                              f"{storage.describe(error)}") from None
        self._renewer = threading.Thread(target=self._renew, name="flax-captioner-lease",
                                         daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        renewed = time.time()
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                leases = self._leases()
                if leases and leases[-1][1] != self.name:
                    self._lost = f"another run took it over ({leases[-1][1]})"
                    return
                self.fs.pipe_file(self.name, self._payload())
                renewed = time.time()
            except Exception as error:  # the store is down: the lease may run out
                if time.time() - renewed > self.lease_seconds:
                    self._lost = f"its lease ran out unrenewed ({storage.describe(error)})"
                    return

    def check(self) -> None:
        if self._lost is not None:
            raise OutputError(f"{self.output}: this run lost the output's lock: {self._lost}")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.name is not None and self._lost is None:
            with contextlib.suppress(Exception):  # a lease left behind expires by itself
                self.fs.rm_file(self.name)
        self.name = None


def make_manifest(output_format: str, model: Mapping[str, Any],
                  settings: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's rows depend on: this tool's version, the format, the model (its
    fingerprint) and every choice that changes a row (JSON values)."""
    return {"tool": "flax-captioner", "version": importlib.metadata.version("flax-captioner"),
            "format": output_format, "model": dict(model),
            "settings": json.loads(json.dumps(settings, default=list))}


def read_manifest(output: str,
                  storage_options: StorageOptions | None = None) -> dict[str, Any] | None:
    """``output``'s manifest; None when it has none.

    Raises:
      OutputError: the manifest cannot be read or is not one.
    """
    path = manifest_path(output)
    try:
        if storage.is_remote(path):
            fs, remote = storage.filesystem(path, storage_options)
            data = fs.cat_file(remote)
        else:
            with open(storage.local_path(path), "rb") as handle:
                data = handle.read()
    except FileNotFoundError:
        return None
    except Exception as error:
        raise OutputError(f"{path}: cannot read the output's manifest: "
                          f"{storage.describe(error)}") from None
    try:
        manifest = json.loads(data)
        if manifest.get("tool") != "flax-captioner":
            raise ValueError
    except (ValueError, AttributeError):
        raise OutputError(f"{path}: not a flax-captioner manifest; {output} is left as it "
                          "is", fix=("other_output",)) from None
    return manifest


def write_manifest(output: str, manifest: Mapping[str, Any],
                   storage_options: StorageOptions | None = None) -> None:
    """Writes ``output``'s manifest whole or not at all (a rename; one PUT)."""
    path = manifest_path(output)
    payload = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    try:
        if storage.is_remote(path):
            fs, remote = storage.filesystem(path, storage_options)
            fs.pipe_file(remote, payload)
            return
        path = storage.local_path(path)
        with open(f"{path}.tmp", "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(f"{path}.tmp", path)
    except Exception as error:
        raise OutputError(f"{path}: cannot write the output's manifest: "
                          f"{storage.describe(error)}") from None


def remove_manifest(output: str, storage_options: StorageOptions | None = None) -> None:
    """Removes ``output``'s manifest, if any."""
    path = manifest_path(output)
    with contextlib.suppress(FileNotFoundError):
        if storage.is_remote(path):
            fs, remote = storage.filesystem(path, storage_options)
            fs.rm_file(remote)
        else:
            os.remove(storage.local_path(path))


def check_existing(output: str, output_format: str, *, resume: bool,
                   storage_options: StorageOptions | None = None) -> dict[str, Any] | None:
    """Refuses, before anything is touched, an output a run must not write: one holding
    rows but no manifest (not this tool's: never modified, moved or deleted), or, to be
    resumed, one of another format. Returns its manifest (None: it has none).

    Raises:
      OutputError: naming the output and the cause.
    """
    return _existing(output, output_format, resume, storage_options)[0]


def check_resumable(output: str, manifest: Mapping[str, Any], *, resume: bool,
                    storage_options: StorageOptions | None = None) -> None:
    """``check_existing``, and when resuming an output with rows, refuses a run whose
    ``manifest`` differs from theirs (its rows would mix with theirs), naming what differs.
    Call it holding the output's lock, before the writer opens; write the run's manifest once
    the writer has opened (a start-over has then removed the old rows), before any row.

    Raises:
      OutputError: naming the output and what differs.
    """
    found, present = _existing(output, manifest["format"], resume, storage_options)
    changes = differences(found, manifest) if found is not None and resume and present else []
    if changes:
        raise OutputError(f"{output}: its rows were made otherwise ({'; '.join(changes)}); "
                          "resume with the settings they were made with",
                          fix=("start_over", "other_output"))


def _existing(output: str, output_format: str, resume: bool,
              storage_options: StorageOptions | None) -> tuple[dict[str, Any] | None, bool]:
    """(``output``'s manifest, whether it holds any output), after ``check_existing``'s
    refusals."""
    manifest = read_manifest(output, storage_options)
    present = output_present(output, storage_options)
    if manifest is None and present:
        raise OutputError(f"{output}: exists and is not a flax-captioner output (no "
                          f"{manifest_path(output)} beside it); it is left as it is",
                          fix=("other_output",))
    if manifest is not None and resume and present and manifest.get("format") != output_format:
        raise OutputError(f"{output}: holds {manifest.get('format')} rows, not the "
                          f"{output_format} asked for", fix=("start_over", "other_output"))
    return manifest, present


def differences(made_with: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    """What differs between two manifests, as ``name: old -> new`` (compared fields only;
    the model by its fingerprint, not its name or path)."""
    changes = []
    for field in _COMPARED:
        old, new = made_with.get(field), asked.get(field)
        if field == "model":
            old, new = (old or {}).get("fingerprint"), (new or {}).get("fingerprint")
            if old != new:
                changes.append(f"model {made_with.get('model', {}).get('name')} -> "
                               f"{asked.get('model', {}).get('name')} (other weights)")
        elif isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key} {old.get(key)!r} -> {new.get(key)!r}"
                        for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
        elif old != new:
            changes.append(f"{field} {old!r} -> {new!r}")
    return changes


def check_not_input(output: str, inputs: CheckedInputs) -> None:
    """Refuses an output that is also one of the inputs (a table, a list, a shard, a glob's
    match): writing it would destroy what the run reads.

    Raises:
      OutputError: naming the input.
    """
    def place(path: str, remote: bool) -> str:  # a comparable form: bucket/key, or realpath
        if remote:
            return path.split("://", 1)[-1].rstrip("/")
        return os.path.realpath(storage.local_path(path))

    target = place(output, storage.is_remote(output))
    for spec, matches in zip(inputs.specs, inputs.matches):
        remote = storage.is_remote(spec)
        if remote != storage.is_remote(output):
            continue
        for candidate in (spec, *(matches or ())):
            if place(candidate, remote) == target:
                raise OutputError(f"{output}: is also an input ({spec}); writing it would "
                                  "destroy it", fix=("other_output",))
