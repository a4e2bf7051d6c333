"""ShardPlan: which attention heads and MLP columns each rank holds, as a small JSON file.

    plan = make_plan(LlamaConfig.from_dir("hf_dir"), world_size=3, weights=[1, 1, 2])
    plan.save("shards/plan.json")
    ShardPlan.load("shards/rank1/plan.json").check(config)   # every rank checks before it starts

Attention is split by whole KV-head groups (rank r holds KV heads kv_heads[r] = [a, b) and the
query heads of those groups, [a*g, b*g) with g = heads / kv_heads); the MLP intermediate dimension
is split separately (finer than the head split; with quantized weights in the whole chunks
split.llama.quantize.row_units fixes, as coarse as the KV heads). Both are proportional to the
per-rank weights by largest-remainder apportionment with at least one unit per rank, so any world
size from 1 up to the number of KV heads works and no power-of-two rule applies. Rank 0 (the
master) additionally holds the embeddings, the final norm and the LM head.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from split.llama import LlamaConfig

FORMAT_VERSION = 1


# LlamaConfig fields added after plans were first written, hashed only when not at these values,
# so a shard folder prepared before them still matches its model.
_LATER_FIELDS = {"qk_norm": False, "partial_rotary_factor": 1.0}


def config_hash(config: LlamaConfig) -> str:
    """A short stable hash of what config.json means to the model (not of its whitespace)."""
    d = {k: v for k, v in dataclasses.asdict(config).items()
         if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_identity(config: LlamaConfig) -> dict:
    return dict(num_layers=config.num_hidden_layers, hidden=config.hidden_size,
                heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                head_dim=config.head_dim, intermediate=config.intermediate_size,
                vocab=config.vocab_size, config_hash=config_hash(config))


def apportion(total: int, weights: list[float], minimum: int = 1) -> list[int]:
    """Split `total` units into len(weights) integer shares proportional to the weights
    (largest remainder, ties to the lower rank), every share >= minimum."""
    n = len(weights)
    if total < minimum * n:
        raise ValueError(f"cannot give {n} ranks at least {minimum} of {total} units each")
    s = float(sum(weights))
    quota = [total * w / s for w in weights]
    alloc = [max(minimum, math.floor(q)) for q in quota]
    while sum(alloc) < total:  # hand out the rest by largest remainder
        r = max(range(n), key=lambda i: (quota[i] - alloc[i], -i))
        alloc[r] += 1
    while sum(alloc) > total:  # minimums overshot: take back where the surplus over quota is largest
        r = max((i for i in range(n) if alloc[i] > minimum), key=lambda i: (alloc[i] - quota[i], i))
        alloc[r] -= 1
    return alloc


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for n in sizes:
        out.append((a, a + n))
        a += n
    return out


def parse_weights(text: str | None, world_size: int) -> list[float]:
    """"1,1,2" -> [1.0, 1.0, 2.0]; None -> equal weights."""
    if text is None or text == "":
        return [1.0] * world_size
    try:
        weights = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise ValueError(f"weights must be comma-separated numbers such as 1,1,2, got {text!r}") from None
    return weights


@dataclass
class ShardPlan:
    world_size: int
    weights: list[float]
    kv_heads: list[tuple[int, int]]  # per rank [start, stop) in KV heads
    mlp: list[tuple[int, int]]  # per rank [start, stop) of the intermediate dimension
    model: dict  # model_identity(config)
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    # --- per-rank views -------------------------------------------------------------------------
    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.model["heads"] // self.model["kv_heads"]

    def q_heads(self, rank: int) -> tuple[int, int]:
        a, b = self.kv_heads[rank]
        return a * self.group, b * self.group

    def q_rows(self, rank: int) -> tuple[int, int]:
        """Rows of q_proj (= columns of o_proj) held by `rank`."""
        a, b = self.q_heads(rank)
        return a * self.model["head_dim"], b * self.model["head_dim"]

    def kv_rows(self, rank: int) -> tuple[int, int]:
        a, b = self.kv_heads[rank]
        return a * self.model["head_dim"], b * self.model["head_dim"]

    # --- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dict(format_version=self.format_version, world_size=self.world_size, weights=self.weights,
                    kv_heads=[list(r) for r in self.kv_heads], mlp=[list(r) for r in self.mlp],
                    model=dict(self.model), extra=dict(self.extra))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardPlan":
        if not isinstance(d, dict):
            raise ValueError(f"plan must be a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"plan format_version must be {FORMAT_VERSION}, got {version!r}")
        for name in ("world_size", "weights", "kv_heads", "mlp", "model"):
            if name not in d:
                raise ValueError(f"plan is missing the field {name!r}")
        try:
            kv = [tuple(int(x) for x in r) for r in d["kv_heads"]]
            mlp = [tuple(int(x) for x in r) for r in d["mlp"]]
        except (TypeError, ValueError):
            raise ValueError("plan fields kv_heads and mlp must be lists of [start, stop] pairs") from None
        return cls(world_size=d["world_size"], weights=list(d["weights"]), kv_heads=kv, mlp=mlp,
                   model=dict(d["model"]), format_version=version, extra=dict(d.get("extra", {})))

    @classmethod
    def from_json(cls, text: str) -> "ShardPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"plan is not valid JSON: {err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ShardPlan":
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise FileNotFoundError(f"no plan.json at {path}")
        return cls.from_json(path.read_text())

    # --- checks ---------------------------------------------------------------------------------
    def check(self, config: LlamaConfig, rank: int | None = None) -> None:
        """Raise ValueError naming the field if this plan does not fit `config` (or is inconsistent)."""
        want = model_identity(config)
        for key, value in want.items():
            if self.model.get(key) != value:
                raise ValueError(f"plan model.{key} is {self.model.get(key)!r} but config.json gives "
                                 f"{value!r}: the shards were prepared for a different model")
        W = self.world_size
        if isinstance(W, bool) or not isinstance(W, int) or W < 1:
            raise ValueError(f"plan world_size must be a positive integer, got {W!r}")
        for name, n in (("weights", len(self.weights)), ("kv_heads", len(self.kv_heads)), ("mlp", len(self.mlp))):
            if n != W:
                raise ValueError(f"plan {name} must have world_size={W} entries, got {n}")
        for name, ranges, total in (("kv_heads", self.kv_heads, config.num_key_value_heads),
                                    ("mlp", self.mlp, config.intermediate_size)):
            pos = 0
            for r, (a, b) in enumerate(ranges):
                if a != pos or b <= a:
                    raise ValueError(f"plan {name}[{r}] must be a non-empty range starting at {pos}, "
                                     f"got [{a}, {b})")
                pos = b
            if pos != total:
                raise ValueError(f"plan {name} must cover [0, {total}), it ends at {pos}")
        if rank is not None and not 0 <= rank < W:
            raise ValueError(f"rank must be in [0, {W}) for this plan, got {rank}")


def _whole_chunks(chunks: list[tuple[int, int]], weights: list[float]) -> list[tuple[int, int]]:
    """apportion() of whole `chunks` (ranges tiling a dimension, in order): each rank's [start, stop)."""
    if len(chunks) < len(weights):
        raise ValueError(f"cannot split the MLP's {len(chunks)} fixed chunk(s) over {len(weights)} ranks "
                         "(a rank takes whole ones)")
    ends = _ranges(apportion(len(chunks), weights))
    return [(chunks[a][0], chunks[b - 1][1]) for a, b in ends]


def make_plan(config: LlamaConfig, world_size: int, weights: list[float] | None = None,
              mlp_chunks: list[tuple[int, int]] | None = None) -> ShardPlan:
    """Plan a `world_size`-way split of `config`, shares proportional to `weights` (default equal).
    The MLP is split in columns, or in whole `mlp_chunks` (quantized weights: the fixed chunks whose
    partial sums split.llama.quantize.row_units rounds on their own, so every plan sums the same)."""
    kv = config.num_key_value_heads
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 1 <= world_size <= kv:
        raise ValueError(f"world_size must be an integer from 1 to num_key_value_heads={kv} "
                         f"(attention is split by whole KV heads), got {world_size!r}")
    weights = [1.0] * world_size if weights is None else [float(w) for w in weights]
    if len(weights) != world_size:
        raise ValueError(f"weights must have world_size={world_size} entries, got {len(weights)}")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"weights must all be positive finite numbers, got {weights}")
    mlp = (_ranges(apportion(config.intermediate_size, weights)) if mlp_chunks is None
           else _whole_chunks(mlp_chunks, weights))
    plan = ShardPlan(world_size=world_size, weights=weights, kv_heads=_ranges(apportion(kv, weights)), mlp=mlp,
                     model=model_identity(config))
    plan.check(config)
    return plan
