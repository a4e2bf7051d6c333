"""The models on a device: pulled from the cloud (fleet_client.FleetClient), verified,
swapped in atomically.

    store = ModelStore(Path("/var/lib/edgefold/models"))
    with FleetClient("cloud:8001") as fleet:
        model, changed = store.pull(fleet, "stages", progress=True)
    onnxruntime.InferenceSession(str(model.path / model.version / "model.onnx"))

Layout under root (JSON only):

    <name>/CURRENT                 {"version": "3", "digest": "ab12...", "previous": "cd34..." or null}
    <name>/<digest>/config.toml    the model folder as in the cloud's repository
    <name>/<digest>/3/model.onnx
    .partial/<name>-<digest>/...   a download in progress; the next pull resumes it

A pull downloads into .partial, checks every file's sha256 and the manifest's digest, moves
the folder to <name>/<digest>/, then replaces CURRENT (temp file, fsync, os.replace). So a
reader going through current() never sees a half-written model, and a crash at any point
leaves either the old model or the new one, plus leftovers the next pull resumes or removes.
A CURRENT whose folder is gone counts as no model. One process pulls into a store at a time.
"""
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from edge_runtime.client.fleet_client import FleetProtocolError, Manifest
from edgefold_proto.fleet import manifest_digest, path_problem

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DIGEST = re.compile(r"^[0-9a-f]{64}$")
VERSION = re.compile(r"^[0-9]{1,18}$")


class ModelIntegrityError(Exception):
    """What the cloud sent does not match its manifest; the current model stays in place."""


@dataclass(frozen=True)
class InstalledModel:
    name: str
    version: str
    digest: str
    path: Path         # laid out like the repository's model folder: path / version / "model.onnx"


def _check_name(name: str) -> None:
    if not NAME.match(name) or name in (".", ".."):
        raise ValueError(f"model name '{name}' must be letters, digits, '_', '.', '-'")


def _check_manifest(m: Manifest, name: str, version: str) -> None:
    """The cloud's answer is used to build paths on this device: trust none of it."""
    def bad(why):
        return ModelIntegrityError(f"model '{name}': the manifest {why}")
    if m.name != name or (version and m.version != version) or not VERSION.match(m.version):
        raise bad(f"is for '{m.name}' version '{m.version}', not '{name}' version '{version or 'highest'}'")
    if not DIGEST.match(m.digest) or m.digest != manifest_digest((f.path, f.sha256) for f in m.files):
        raise bad("digest does not match its files")
    if len({f.path for f in m.files}) != len(m.files):
        raise bad("lists a file twice")
    for f in m.files:
        if path_problem(f.path) or not (f.path == "config.toml" or f.path.startswith(f"{m.version}/")):
            raise bad(f"path '{f.path}' is not config.toml or a relative path under {m.version}/")
        if f.size < 0 or not DIGEST.match(f.sha256):
            raise bad(f"entry for '{f.path}' has size {f.size} and sha256 '{f.sha256}'")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _complete(folder: Path, m: Manifest) -> bool:
    """Every file of the manifest is there with its size (the hashes were checked on the way in)."""
    return folder.is_dir() and all((folder / f.path).is_file() and (folder / f.path).stat().st_size == f.size
                                   for f in m.files)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:          # not supported here (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    def __init__(self, root: Path, keep_previous: bool = True):
        self.root = Path(root)
        self.keep_previous = keep_previous    # keep the model CURRENT pointed at before, for the swap
        self.root.mkdir(parents=True, exist_ok=True)

    def _pointer(self, name: str) -> dict | None:
        """CURRENT as {version, digest, previous}, or None when it is missing or not what we write."""
        try:
            data = json.loads((self.root / name / "CURRENT").read_text(encoding="utf-8"))
            version, digest, previous = str(data["version"]), str(data["digest"]), data.get("previous")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if not (VERSION.match(version) and DIGEST.match(digest)):
            return None
        previous = previous if isinstance(previous, str) and DIGEST.match(previous) else None
        return {"version": version, "digest": digest, "previous": previous}

    def current(self, name: str) -> InstalledModel | None:
        """The model CURRENT points at, or None (none pulled, or its folder is gone)."""
        _check_name(name)
        data = self._pointer(name)
        if data is None or not (self.root / name / data["digest"]).is_dir():
            return None
        return InstalledModel(name, data["version"], data["digest"], self.root / name / data["digest"])

    def installed(self) -> list[InstalledModel]:
        """The current model of every name in the store (what a heartbeat reports)."""
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name))
        return [m for m in map(self.current, names) if m is not None]

    def pull(self, client, name: str, version: str = "", progress: bool = False,
             on_bytes=None) -> tuple[InstalledModel, bool]:
        """Make `name` at `version` ("" = the cloud's highest) current; returns (model, changed).
        Raises ModelIntegrityError on a file that does not match, grpc.RpcError when the cloud
        fails (the bytes downloaded so far stay and the next pull resumes)."""
        _check_name(name)
        manifest = client.manifest(name, version)
        _check_manifest(manifest, name, version)
        current = self.current(name)
        if current and current.digest == manifest.digest and _complete(current.path, manifest):
            return current, False
        final = self.root / name / manifest.digest
        if not _complete(final, manifest):     # else installed before: the previous model, or a crash before CURRENT
            partial = self._download(client, manifest, progress, on_bytes)
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)
            _fsync_dir(final.parent)
        previous = current.digest if current and self.keep_previous else None
        if previous == manifest.digest:        # a repair of the current folder: keep the one before it
            previous = self._pointer(name)["previous"]
        self._point_current(name, manifest, previous)
        self._clean(name, keep={manifest.digest, previous})
        return InstalledModel(name, manifest.version, manifest.digest, final), True

    def _download(self, client, m: Manifest, progress: bool, on_bytes) -> Path:
        """Every file of `m` into .partial/<name>-<digest>/, resuming, each checked; returns the folder."""
        partial = self.root / ".partial" / f"{m.name}-{m.digest}"
        have = {}
        for f in m.files:
            dest = partial / f.path
            have[f.path] = dest.stat().st_size if dest.is_file() else -1
            if have[f.path] > f.size:            # cannot be a prefix of the file: start over
                dest.unlink()
                have[f.path] = -1
        todo = sum(f.size - max(have[f.path], 0) for f in m.files)
        with tqdm(total=todo, unit="B", unit_scale=True, desc=m.name, disable=not progress) as bar:
            def count(n):
                bar.update(n)
                if on_bytes is not None:
                    on_bytes(n)
            for f in m.files:
                dest = partial / f.path
                if have[f.path] < f.size:         # -1: not there yet (an empty file still gets created)
                    try:
                        client.download_file(m.name, m.version, f.path, dest, offset=max(have[f.path], 0),
                                             on_bytes=count, size=f.size)
                    except FleetProtocolError as err:
                        dest.unlink(missing_ok=True)
                        raise ModelIntegrityError(f"model '{m.name}' file '{f.path}': {err}; the partial file "
                                                  "was deleted and the current model stays") from None
                actual = _sha256(dest)
                if actual != f.sha256:
                    dest.unlink()
                    raise ModelIntegrityError(f"model '{m.name}' file '{f.path}': sha256 {actual} does not match "
                                              f"the manifest's {f.sha256}; the partial file was deleted and the "
                                              "current model stays")
        _fsync_dir(partial)
        return partial

    def _point_current(self, name: str, m: Manifest, previous: str | None) -> None:
        target = self.root / name / "CURRENT"
        tmp = target.with_name("CURRENT.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"version": m.version, "digest": m.digest, "previous": previous}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def _clean(self, name: str, keep: set) -> None:
        """Remove this model's other digests and its leftover partial downloads."""
        for child in (self.root / name).iterdir():
            if child.is_dir() and child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)
        partials = self.root / ".partial"
        for child in partials.iterdir() if partials.is_dir() else ():
            stem, _, digest = child.name.rpartition("-")
            if stem == name and DIGEST.match(digest):
                shutil.rmtree(child, ignore_errors=True)
