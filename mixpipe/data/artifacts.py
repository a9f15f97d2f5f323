"""Crash-safe, idempotent output of prepared datasets: one manifest per artifact.

An artifact (a JPEG tree, a file list, an array file, a .beton) is built under a temporary name
inside the output directory, renamed into place, and only then given its manifest
``OUT/.manifest-<name>.json``. The manifest records the recipe (source identity and settings) and
a fingerprint of what was written. Hence:

- a re-run with the same recipe and an intact artifact skips it;
- an artifact without a manifest, with a stale recipe, whose content no longer matches its
  fingerprint, or whose temporary directory ``OUT/.tmp-<name>-*`` is still present (a run died
  while rebuilding it) is deleted and rebuilt, and readers refuse to use it meanwhile.

The output directory carries a marker file so that a directory holding someone else's files is
never written into (or deleted from), and the marker is locked so two runs cannot interleave.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Optional

from ..core.ledger import atomic_write
from .errors import DataError

__all__ = ["Artifact", "OutputDir", "fingerprint", "read_manifest", "manifest_path",
           "check_artifact", "MARKER", "FORMAT"]

FORMAT = 1
MARKER = ".mixpipe-prepare"
_TMP = ".tmp-"
#: why an artifact that was never written cannot be read; ``OutputDir.ensure`` leaves it out of
#: its "write" line, where before any work it reads like a failure
_NOT_WRITTEN = "not written yet"
#: Files smaller than this are hashed on every check; larger ones only with ``verify``.
_ALWAYS_HASH = 1 << 20


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One output: where it goes, what it is made from, how to build and check it.

    ``build(path)`` writes the artifact at ``path`` (a fresh temporary name) and returns extra
    facts for the manifest (e.g. ``{"samples": n}``). ``check(path, manifest)`` returns a reason
    the artifact is unusable, or None; it looks at structure the fingerprint cannot see.
    """

    name: str
    relpath: str
    recipe: Dict[str, Any]
    build: Callable[[str], Dict[str, Any]]
    check: Optional[Callable[[str, Dict[str, Any]], Optional[str]]] = None


def manifest_path(root: str, name: str) -> str:
    return os.path.join(root, f".manifest-{name}.json")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _dir_fingerprint(path: str) -> Dict[str, Any]:
    digest, files, total = hashlib.sha256(), 0, 0
    stack = [""]
    entries = []
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(path, rel)) as it:
            for entry in it:
                sub = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(sub)
                else:
                    entries.append((sub, entry.stat(follow_symlinks=False).st_size))
    for sub, size in sorted(entries):
        digest.update(f"{sub}\t{size}\n".encode())
        files += 1
        total += size
    return {"kind": "dir", "files": files, "bytes": total, "digest": digest.hexdigest()}


def fingerprint(path: str, full_hash: bool = True) -> Optional[Dict[str, Any]]:
    """What a later run compares against: link target, file size (+ sha256), or a directory's
    sorted (path, size) listing. None when nothing is at ``path``."""
    if os.path.islink(path):
        return {"kind": "link", "target": os.readlink(path)}
    if os.path.isdir(path):
        return _dir_fingerprint(path)
    if os.path.isfile(path):
        size = os.path.getsize(path)
        out: Dict[str, Any] = {"kind": "file", "size": size}
        if full_hash or size < _ALWAYS_HASH:
            out["sha256"] = _sha256(path)
        return out
    return None


def read_manifest(root: str, name: str) -> Optional[Dict[str, Any]]:
    """The artifact's manifest, or None if it is missing or unreadable."""
    try:
        with open(manifest_path(root, name)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _normalise(recipe: Dict[str, Any]) -> Any:
    return json.loads(json.dumps(recipe, sort_keys=True))


def check_artifact(root: str, name: str, relpath: Optional[str] = None,
                   recipe: Optional[Dict[str, Any]] = None, verify: bool = False,
                   check: Optional[Callable[[str, Dict[str, Any]], Optional[str]]] = None
                   ) -> Optional[str]:
    """Why the artifact ``name`` under ``root`` cannot be used, or None if it is complete.

    ``recipe`` None skips the recipe comparison (readers do not know how it was made).
    """
    if any(e.startswith(f"{_TMP}{name}-") for e in os.listdir(root)):
        return "a temporary copy from an interrupted run is still present"
    manifest = read_manifest(root, name)
    if manifest is None:
        if relpath is not None and not os.path.lexists(os.path.join(root, relpath)):
            return _NOT_WRITTEN
        return "no manifest (the run writing it was interrupted?)"
    if manifest.get("format") != FORMAT or manifest.get("artifact") != name:
        return "the manifest is of another format or artifact"
    if relpath is not None and manifest.get("path") != relpath:
        return "the manifest names another path"
    if recipe is not None and manifest.get("recipe") != _normalise(recipe):
        return "the source or the settings changed"
    path = os.path.join(root, manifest.get("path", ""))
    recorded = manifest.get("content") or {}
    current = fingerprint(path, full_hash=verify)
    if current is None:
        return "it is missing"
    for key, value in current.items():
        if recorded.get(key) != value:
            return f"its content changed since it was written ({key} differs)"
    if current["kind"] == "link" and not os.path.exists(path):
        return "its link target is gone"
    return check(path, manifest) if check is not None else None


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


class OutputDir:
    """The output directory of one ``prepare`` run; use as a context manager (holds the lock)."""

    def __init__(self, root: str, verify: bool = False,
                 log: Callable[[str], None] = print) -> None:
        self.root = os.path.abspath(root)
        self.verify = verify
        self.log = log
        self._lock_fd: Optional[int] = None
        self.built: list = []
        self.skipped: list = []
        #: artifacts whose temporary copy an interrupted run left behind (removed on entry)
        self.interrupted: set = set()

    def __enter__(self) -> "OutputDir":
        marker = os.path.join(self.root, MARKER)
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise DataError(f"output {self.root} exists and is not a directory")
        if os.path.isdir(self.root) and os.listdir(self.root) and not os.path.exists(marker):
            raise DataError(f"output directory {self.root} is not empty and was not written by "
                            "`mixpipe data prepare`; choose a new or empty directory")
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(f"another `mixpipe data prepare` is writing to {self.root}; "
                            "wait for it to finish") from None
        if os.fstat(fd).st_size == 0:  # leave an existing marker untouched (mtimes tell)
            os.write(fd, b"written by `mixpipe data prepare`; see .manifest-*.json\n")
        self._lock_fd = fd
        # With the lock held, every temporary entry is a leftover of a run that died.
        for entry in sorted(os.listdir(self.root)):
            if entry.startswith(_TMP):
                self.interrupted.add(entry[len(_TMP):].rsplit("-", 1)[0])
                self.log(f"clean {entry}: left behind by an interrupted run")
                _remove(os.path.join(self.root, entry))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def ensure(self, art: Artifact) -> bool:
        """Build ``art`` unless it is already complete; True if it was (re)built."""
        if art.name in self.interrupted:
            reason: Optional[str] = "a run rebuilding it was interrupted"
        else:
            reason = check_artifact(self.root, art.name, art.relpath, art.recipe, self.verify,
                                    art.check)
        if reason is None:
            self.log(f"skip  {art.relpath}: complete")
            self.skipped.append(art.name)
            return False
        # a first write needs no reason; a rebuild of something that was there says why
        self.log(f"write {art.relpath}" if reason == _NOT_WRITTEN
                 else f"write {art.relpath}: {reason}")
        # The manifest goes first: from here until the new one is written the artifact is
        # known incomplete, whatever else survives an interruption.
        _remove(manifest_path(self.root, art.name))
        tmp = tempfile.mkdtemp(prefix=f"{_TMP}{art.name}-", dir=self.root)
        payload = os.path.join(tmp, os.path.basename(art.relpath))
        final = os.path.join(self.root, art.relpath)
        try:
            info = art.build(payload) or {}
            _remove(final)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(payload, final)
            os.rmdir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        manifest = {"format": FORMAT, "artifact": art.name, "path": art.relpath,
                    "recipe": _normalise(art.recipe), "info": info,
                    "content": fingerprint(final, full_hash=True)}
        atomic_write(manifest_path(self.root, art.name),
                     json.dumps(manifest, indent=1, sort_keys=True).encode())
        os.chmod(manifest_path(self.root, art.name), 0o644)  # readable like the data it describes
        self.built.append(art.name)
        return True

    def discard(self, name: str, relpath: str, recipe: Dict[str, Any]) -> None:
        """Delete an artifact this run does not produce if it no longer matches the source, so a
        stale copy is never read beside fresh ones. A matching one is left alone."""
        manifest = read_manifest(self.root, name)
        path = os.path.join(self.root, relpath)
        if manifest is None and not os.path.lexists(path):
            return
        if name not in self.interrupted and check_artifact(self.root, name, relpath,
                                                           recipe) is None:
            return
        self.log(f"remove {relpath}: stale or incomplete, and not requested this run")
        _remove(manifest_path(self.root, name))
        _remove(path)
