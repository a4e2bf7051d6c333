"""The model repository: `DIR/<model>/<version>/model.onnx` (or model.py), optional
`DIR/<model>/config.toml`. Every numeric version folder is loaded; a request without a
version gets the highest. Models load at start and through RepositoryModelLoad/Unload;
a reload builds the new versions before it swaps them in, so serving never pauses.

A folder whose config.toml says `backend = "device"` is a device package: devices download
it through the Fleet service (cloud_service/fleet.py), this server never loads it, and
RepositoryIndex lists it as UNAVAILABLE, "device package: download only".
"""
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from cloud_service.backends import open_backend
from cloud_service.config import DEVICE_BACKEND, ConfigError, load_config
from cloud_service.served_model import ServedModel
from edgefold_proto.fleet import MODEL_NAME
from edgefold_proto.serving import InvalidArgument, NotFound

log = logging.getLogger(__name__)
DEVICE_PACKAGE = "device package: download only"


def version_dirs(model_dir: Path) -> list[Path]:
    """The numeric version folders of a model, lowest first."""
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


@dataclass
class IndexEntry:
    name: str
    version: str
    state: str   # READY or UNAVAILABLE
    reason: str = ""


class Repository:
    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"--repository {self.root}: not a directory")
        self.models: dict[str, dict[str, ServedModel]] = {}  # name -> version -> model
        self.failures: dict[str, str] = {}                    # name -> why it did not load

    def model_dir(self, name: str) -> Path:
        if not MODEL_NAME.match(name) or name in (".", ".."):
            raise InvalidArgument(f"model name '{name}' must be letters, digits, '_', '.', '-' (a folder in the repository)")
        return self.root / name

    def available(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME.match(p.name))

    def build(self, name: str) -> dict[str, ServedModel]:
        """Open every version of a model (slow: call off the event loop). Raises ConfigError/NotFound.
        A device package gives {}: nothing to serve."""
        model_dir = self.model_dir(name)
        if not model_dir.is_dir():
            raise NotFound(f"model '{name}' is not in the repository {self.root}")
        config = load_config(model_dir)
        versions = version_dirs(model_dir)
        if not versions:
            raise ConfigError(f"{model_dir}: no numeric version folder (e.g. {model_dir}/1/model.onnx)")
        if config.backend == DEVICE_BACKEND:
            return {}
        built = {}
        for version_dir in versions:
            backend = open_backend(version_dir, config)
            if config.decoupled and not hasattr(backend, "open_stream"):
                backend.close()
                raise ConfigError(f"{model_dir}: [model_transaction_policy] decoupled = true, but backend "
                                  f"'{backend.platform or type(backend).__name__}' answers each request once")
            version_config = replace(config, inputs=backend.inputs, outputs=backend.outputs)
            built[version_dir.name] = ServedModel(name, version_dir.name, version_config, backend)
        return built

    def swap_in(self, name: str, versions: dict[str, ServedModel]) -> list[ServedModel]:
        """Serve `versions` (already started); returns the replaced ones for the caller to close.
        No versions (a device package) serves nothing and says why in get() and index()."""
        old = self.models.pop(name, {})
        if versions:
            self.models[name] = versions
            self.failures.pop(name, None)
        else:
            self.failures[name] = DEVICE_PACKAGE
        return list(old.values())

    def remove(self, name: str) -> list[ServedModel]:
        self.model_dir(name)
        if name not in self.models:
            raise NotFound(f"model '{name}' is not loaded")
        return list(self.models.pop(name).values())

    def get(self, name: str, version: str = "") -> ServedModel:
        versions = self.models.get(name)
        if not versions:
            reason = self.failures.get(name)
            raise NotFound(f"model '{name}' is not loaded" + (f": {reason}" if reason else ""))
        if not version:
            return versions[max(versions, key=int)]
        model = versions.get(version)
        if model is None:
            raise NotFound(f"model '{name}' has no version '{version}'; it has {', '.join(sorted(versions, key=int))}")
        return model

    def index(self) -> list[IndexEntry]:
        entries = []
        for name in sorted(set(self.available()) | set(self.models)):
            if name in self.models:
                entries += [IndexEntry(name, v, "READY") for v in sorted(self.models[name], key=int)]
            else:
                entries.append(IndexEntry(name, "", "UNAVAILABLE", self.failures.get(name, "not loaded")))
        return entries
