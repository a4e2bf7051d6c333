"""Device profiles: `devices/profiles/<name>.toml` (peak compute, memory, storage, power, links),
each value with its source in a comment. No torch here.

    profile = load_profile("raspberry-pi-4")        # or a path to a .toml file
    profile.fp32_gflops, profile.link("wifi").rate_mbit, profile_names()

Errors name the file and the field: `ProfileError: devices/profiles/x.toml: compute.fp32_gflops
must be a number > 0, got -1`.

Your own profiles: put `<name>.toml` files (the same format; `edge-runtime probe --out` writes one
for the machine it runs on) in folders listed in EDGEFOLD_PROFILE_PATH (separated by os.pathsep,
`:` on Linux). Those folders are searched in order before the bundled one, so a user file may
replace a bundled profile of the same name. A path ending in .toml always loads that file.

    EDGEFOLD_PROFILE_PATH=~/profiles:/etc/edgefold edge-runtime plan --device my-board ...

Tensor-parallel shares from profiles (decode is memory-bound on these devices):

    share_weights(["raspberry-pi-4", "raspberry-pi-5"])   # [0.428..., 0.571...]: 12.8 : 17.1 GB/s
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
KINDS = ("edge", "cloud")
COMPUTE = ("fp32_gflops", "int8_gops", "overhead_ms", "memory_gb", "memory_bandwidth_gbs", "storage_read_mbs")
POWER = ("idle_w", "active_w", "radio_tx_w")


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Link:
    name: str
    rate_mbit: float
    rtt_ms: float


@dataclass(frozen=True)
class DeviceProfile:
    key: str                     # file stem, e.g. raspberry-pi-4
    name: str
    kind: str                    # edge | cloud
    fp32_gflops: float
    int8_gops: float
    overhead_ms: float           # fixed cost per inference call (framework, kernel launches)
    memory_gb: float
    memory_bandwidth_gbs: float
    storage_read_mbs: float
    idle_w: float
    active_w: float
    radio_tx_w: float
    links: tuple[Link, ...]

    def link(self, name: str) -> Link:
        for link in self.links:
            if link.name == name:
                return link
        raise ProfileError(f"profile '{self.key}' has no link '{name}' (it has {', '.join(l.name for l in self.links)})")


def search_dirs() -> list[Path]:
    """The folders in EDGEFOLD_PROFILE_PATH (in order, empty entries skipped), then the bundled one."""
    user = [Path(d).expanduser() for d in os.environ.get("EDGEFOLD_PROFILE_PATH", "").split(os.pathsep) if d]
    return user + [PROFILE_DIR]


def profile_names() -> list[str]:
    return sorted({p.stem for d in search_dirs() for p in d.glob("*.toml")})


def find_profile(name: str) -> Path:
    """The first `<name>.toml` along search_dirs()."""
    for folder in search_dirs():
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    searched = ", ".join(str(d) for d in search_dirs())
    raise ProfileError(f"no device profile '{name}' in {searched}; known: {', '.join(profile_names())} "
                       "(or give a path to a .toml file, or list your folders in EDGEFOLD_PROFILE_PATH)")


def _number(table: dict, section: str, key: str, path: Path, allow_zero: bool = False) -> float:
    value = table.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or (allow_zero and value == 0))
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        shown = "missing" if value is None else f"got {value!r}"
        raise ProfileError(f"{path}: {section}.{key} must be a number {bound}, {shown}")
    return float(value)


def load_profile(name_or_path) -> DeviceProfile:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = find_profile(str(name_or_path))
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ProfileError(f"{path}: cannot read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{path}: not valid TOML: {err}") from None
    for key in ("name", "kind"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ProfileError(f"{path}: '{key}' must be a non-empty string")
    if data["kind"] not in KINDS:
        raise ProfileError(f"{path}: kind '{data['kind']}' is not one of {', '.join(KINDS)}")
    values = {}
    for section, keys in (("compute", COMPUTE), ("power", POWER)):
        table = data.get(section)
        if not isinstance(table, dict):
            raise ProfileError(f"{path}: missing [{section}] table")
        for key in keys:
            values[key] = _number(table, section, key, path, allow_zero=key in ("radio_tx_w", "overhead_ms"))
    links = data.get("links", [])
    if not isinstance(links, list) or not links:
        raise ProfileError(f"{path}: needs at least one [[links]] entry (name, rate_mbit, rtt_ms)")
    parsed = []
    for i, link in enumerate(links):
        if not isinstance(link, dict) or not isinstance(link.get("name"), str):
            raise ProfileError(f"{path}: links[{i}].name must be a string")
        parsed.append(Link(link["name"], _number(link, f"links[{i}]", "rate_mbit", path),
                           _number(link, f"links[{i}]", "rtt_ms", path, allow_zero=True)))
    return DeviceProfile(path.stem, data["name"], data["kind"], links=tuple(parsed), **values)


def share_weights(profiles, by: str = "memory_bandwidth_gbs", world_size: int | None = None) -> list[float]:
    """Per-rank tensor-parallel shares proportional to each profile's `by` field (profiles, names or
    .toml paths, one per rank), as fractions summing to 1: the `weights` that tp's make_plan takes.
    The default is memory bandwidth because decoding one token streams every weight once: on these
    devices it is bound by memory, not by FLOPs."""
    profiles = [p if isinstance(p, DeviceProfile) else load_profile(p) for p in profiles]
    if not profiles:
        raise ProfileError("share_weights needs at least one profile")
    if world_size is not None and len(profiles) != world_size:
        raise ProfileError(f"{len(profiles)} profile(s) given ({', '.join(p.key for p in profiles)}) but the "
                           f"world size is {world_size}: give one profile per rank")
    if by not in COMPUTE:
        raise ProfileError(f"share_weights: by={by!r} is not a [compute] field; one of {', '.join(COMPUTE)}")
    values = [getattr(p, by) for p in profiles]
    for p, v in zip(profiles, values):
        if not (math.isfinite(v) and v > 0):
            raise ProfileError(f"profile '{p.key}': compute.{by} is {v}, so it cannot set a share (needs > 0)")
    total = sum(values)
    return [v / total for v in values]


def parse_link(text: str) -> Link:
    """`10mbit,40ms` (rate, round-trip time) -> Link; also `100mbit,5ms`, `1gbit,1ms`, `500kbit,80ms`."""
    try:
        rate_text, rtt_text = [part.strip().lower() for part in text.split(",")]
        units = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
        unit = next(u for u in units if rate_text.endswith(u))
        rate = float(rate_text[:-len(unit)]) * units[unit]
        if not rtt_text.endswith("ms"):
            raise ValueError
        rtt = float(rtt_text[:-2])
    except (ValueError, StopIteration):
        raise ProfileError(f"--link '{text}': expected RATE,RTT such as 10mbit,40ms (kbit|mbit|gbit, ms)") from None
    if rate <= 0 or rtt < 0:
        raise ProfileError(f"--link '{text}': the rate must be > 0 and the RTT >= 0")
    return Link(text, rate, rtt)
