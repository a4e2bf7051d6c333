"""The models on a device: pulled from the cloud (fleet_client.FleetClient), verified,
swapped in atomically.

    store = ModelStore(Path("/var/lib/edgefold/models"), trusted_keys=["ed25519:..."])
    with FleetClient("cloud:8001") as fleet:
        model, changed = store.pull(fleet, "stages", progress=True)
    onnxruntime.InferenceSession(str(model.path / model.version / "model.onnx"))
    store.roll_back("stages", model.digest, "smoke inference failed: ...")   # -> the previous, or None

Layout under root (JSON only):

    <name>/CURRENT                 {"version": "3", "digest": "ab12...", "previous": "cd34..." or null,
                                    "previous_version": "2" or null}
    <name>/REJECTED                {"<digest>": {"version": "4", "reason": "...", "unix_time": ...}, ...}
    <name>/<digest>/config.toml    the model folder as in the cloud's repository
    <name>/<digest>/3/model.onnx
    .partial/<name>-<digest>/...   a download in progress; the next pull resumes it

With `trusted_keys` (the agent's [trust] keys), a pull first checks the manifest's publisher
signature (edgefold_proto.signing: over the name, version and digest) and refuses the version
before downloading a byte (ModelTrustError); the per-file sha256 checks then bind every file to
that digest. A digest in REJECTED (a version the agent rolled back) is neither downloaded nor
installed again (VersionRejected) until the cloud serves a different one.

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
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from edge_runtime.client.fleet_client import FleetProtocolError, Manifest
from edgefold_proto.fleet import MODEL_NAME, VERSION, manifest_digest, path_problem
from edgefold_proto.signing import SignatureError, verify

NAME = MODEL_NAME
DIGEST = re.compile(r"^[0-9a-f]{64}$")
KEEP_REJECTED = 32         # digests remembered per model


class ModelIntegrityError(Exception):
    """What the cloud sent does not match its manifest; the current model stays in place."""


class ModelTrustError(ModelIntegrityError):
    """The version is not signed by one of the pinned keys (or the signature does not verify);
    nothing was downloaded and the current model stays in place."""


class VersionRejected(Exception):
    """The cloud serves a digest this device rolled back; it is not tried again until another appears."""


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


def _write_json(target: Path, data) -> None:
    """Replace `target` atomically (temp file, fsync, os.replace, fsync of the folder)."""
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _version_in(folder: Path) -> str | None:
    """The version of an installed model folder: its one numeric subfolder."""
    versions = [p.name for p in folder.iterdir() if p.is_dir() and VERSION.match(p.name)] if folder.is_dir() else []
    return versions[0] if len(versions) == 1 else None


class ModelStore:
    def __init__(self, root: Path, keep_previous: bool = True, trusted_keys=()):
        self.root = Path(root)
        self.keep_previous = keep_previous    # keep the model CURRENT pointed at before, for the swap
        self.trusted_keys = tuple(trusted_keys)   # "ed25519:..." ids; empty: unsigned versions allowed
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
        previous_version = data.get("previous_version")
        if not (previous and isinstance(previous_version, str) and VERSION.match(previous_version)):
            previous_version = None
        return {"version": version, "digest": digest, "previous": previous, "previous_version": previous_version}

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
        Raises ModelTrustError when keys are pinned and the version is not signed by one of them,
        ModelIntegrityError on a file that does not match, VersionRejected for a digest rolled
        back here, grpc.RpcError when the cloud fails (the bytes downloaded so far stay and the
        next pull resumes)."""
        _check_name(name)
        manifest = client.manifest(name, version)
        _check_manifest(manifest, name, version)
        if self.trusted_keys:
            try:
                verify(self.trusted_keys, name, manifest.version, manifest.digest, manifest.signature,
                       manifest.key_id)
            except SignatureError as err:
                raise ModelTrustError(f"{err}; nothing was downloaded and the current version stays") from None
        current = self.current(name)
        if manifest.digest in self.rejected(name) and not (current and current.digest == manifest.digest):
            raise VersionRejected(f"model '{name}' version {manifest.version} ({manifest.digest[:12]}) was rolled "
                                  "back on this device; it is not tried again until the cloud serves another")
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
        previous = (current.digest, current.version) if current and self.keep_previous else (None, None)
        if previous[0] == manifest.digest:     # a repair of the current folder: keep the one before it
            pointer = self._pointer(name)
            previous = (pointer["previous"], pointer["previous_version"])
        self._point_current(name, manifest.version, manifest.digest, *previous)
        self._clean(name, keep={manifest.digest, previous[0]})
        return InstalledModel(name, manifest.version, manifest.digest, final), True

    def rejected(self, name: str) -> dict:
        """The digests rolled back on this device: {digest: {"version", "reason", "unix_time"}}."""
        _check_name(name)
        try:
            data = json.loads((self.root / name / "REJECTED").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {d: e for d, e in data.items() if DIGEST.match(d) and isinstance(e, dict)
                and isinstance(e.get("reason"), str)}

    def roll_back(self, name: str, bad_digest: str, reason: str, version: str = "") -> InstalledModel | None:
        """`bad_digest` did not open or run: remember it in REJECTED (never pulled again), and if
        CURRENT points at it, point CURRENT back at the previous version when that is still on the
        device (else remove CURRENT: nothing of `name` is installed). Returns what is current now."""
        _check_name(name)
        if not DIGEST.match(bad_digest):
            raise ValueError(f"digest '{bad_digest[:80]}' is not a sha256 hex digest")
        pointer = self._pointer(name)
        if pointer and pointer["digest"] == bad_digest:
            version = version or pointer["version"]
            previous = pointer["previous"]
            folder = self.root / name / previous if previous else None
            previous_version = pointer["previous_version"] or (_version_in(folder) if folder else None)
            if previous and previous != bad_digest and previous_version and folder.is_dir():
                self._point_current(name, previous_version, previous, None, None)
            else:
                (self.root / name / "CURRENT").unlink(missing_ok=True)
                _fsync_dir(self.root / name)
        rejected = self.rejected(name)
        rejected.pop(bad_digest, None)
        rejected[bad_digest] = {"version": version, "reason": reason, "unix_time": time.time()}
        (self.root / name).mkdir(parents=True, exist_ok=True)
        _write_json(self.root / name / "REJECTED", dict(list(rejected.items())[-KEEP_REJECTED:]))
        shutil.rmtree(self.root / name / bad_digest, ignore_errors=True)
        return self.current(name)

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

    def _point_current(self, name: str, version: str, digest: str, previous: str | None,
                       previous_version: str | None) -> None:
        _write_json(self.root / name / "CURRENT", {"version": version, "digest": digest, "previous": previous,
                                                   "previous_version": previous_version if previous else None})

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
