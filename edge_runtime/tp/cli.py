"""`edge-runtime tp ...`: prepare shards, run a worker, generate across ranks, make CURVE keys.

    edge-runtime tp prepare --model HF_DIR --world-size 3 --weights 1,1,2 --out shards/
    edge-runtime tp prepare --model HF_DIR --world-size 2 --weights-from raspberry-pi-4,my-board.toml --out shards/
    edge-runtime tp prepare --model HF_DIR --world-size 4 --quantize int4 --group-size 32 --max-rank-memory 512MiB --out shards/
    edge-runtime tp keys --out keys/          # then give every rank the folder (or just its half)
    edge-runtime tp worker --rank 1 --master 10.0.0.2:29500 --shards shards/rank1 --window 2 --curve-keys keys/
    edge-runtime tp worker --model HF_DIR --listen 0.0.0.0:29600 --curve-keys keys/ [--profile raspberry-pi-5]
                                                # an elastic peer: serves whichever rank a master asks (peer.py)
    edge-runtime tp generate --model HF_DIR --world-size 3 --prompt "Hello" --max-new-tokens 32 --window 2
    edge-runtime tp generate --model HF_DIR --world-size 3 --prompt-ids 1,2,3 --max-new-tokens 32 --json
    edge-runtime tp generate --model HF_DIR --quantize int8 --prompt "Hello"          # one device, int8 weights
    edge-runtime tp generate --model HF_DIR --peers 10.0.0.3:29600,10.0.0.4:29600 --master 0.0.0.0:29500 \
        --curve-keys keys/ ...                  # or --insecure on a network you trust

Without --peers, `generate` prepares the shards (cached under --cache-dir, keyed by the config
hash and the plan) and starts the N-1 workers itself as subprocesses on loopback, and always
stops them. With --peers (elastic peers, `tp worker --model --listen`) it forms a group over those
that answer (group.py: shares from their advertised profiles), binds --master for the collective,
and re-forms the group over the rest when one is lost mid-generation, with no token lost or
repeated. Ranks that talk beyond loopback need --curve-keys or an explicit --insecure.
Exit status of generate: 0 done, 1 a rank failed (the message names it), 2 bad arguments or files.
A worker exits 0 after the master's SHUTDOWN, 3 when the master is gone or aborted the request
(no traceback: it says why on stderr), 1 when it could not join, 2 for bad arguments or files.
This module is the argument parsing and the printing; launch.py starts the ranks, and one
TPConfig (config.py) carries the parsed options to them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from devices.address import is_loopback

from .launch import DEFAULT_CACHE


def add_parser(commands) -> None:
    tp = commands.add_parser("tp", help="tensor-parallel LLM inference across peer devices")
    sub = tp.add_subparsers(dest="tp_command", required=True)

    p = sub.add_parser("prepare", help="cut a Hugging Face folder into per-rank, per-layer shards")
    p.add_argument("--model", required=True, help="Hugging Face folder (config.json + *.safetensors) or a "
                   ".gguf file (read from the file; its config and tokenizer cached in a small folder)")
    p.add_argument("--world-size", type=int, required=True)
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help="per-rank shares, e.g. 1,1,2 (default equal)")
    w.add_argument("--weights-from", metavar="PROFILE[,PROFILE...]",
                   help="device profiles (names or .toml paths), one per rank: shares proportional to their "
                        "memory bandwidth, since decoding on these devices is memory-bound")
    p.add_argument("--out", required=True)
    p.add_argument("--max-rank-memory", metavar="SIZE", help="e.g. 512MiB: each rank's window is the largest "
                   "that fits (budget.py); a plan that cannot fit is refused with the figures")
    weight_format(p)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="the dtype the float weights will be computed in: bf16 splits the MLP in whole units, "
                        "so every plan gives the same bits (give the workers the same --dtype)")

    def comm(p):  # what every rank of a group is told: TPConfig's fields
        p.add_argument("--window", type=int, default=None,
                       help="blocks resident per rank (0 = all; default: the plan's, all without a budget)")
        p.add_argument("--backend", choices=("star", "gloo"), default="star")
        p.add_argument("--payload", choices=("fp32", "fp16", "int8"), default="fp32",
                       help="allreduce payload precision (must match on every rank)")
        p.add_argument("--curve-keys", help="folder from `tp keys`: encrypt and authenticate peers (star)")
        p.add_argument("--insecure", action="store_true", help="let ranks talk beyond loopback without --curve-keys "
                       "(refused otherwise): only on a network you trust")
        p.add_argument("--timeout-s", type=float, default=2.0, help="how long the master waits for a partial")
        p.add_argument("--join-timeout-s", type=float, default=60.0)
        p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                       help="compute dtype of the float (unquantized) weights; int8/int4 always use bf16 kernels")

    p = sub.add_parser("worker", help="serve one rank's shards to a master, or (--model --listen) be an "
                                      "elastic peer that serves whichever rank a master asks")
    p.add_argument("--rank", type=int, help="with --shards: this rank (1..N-1)")
    p.add_argument("--master", help="with --shards: HOST:PORT of rank 0")
    p.add_argument("--shards", help="this rank's folder (or the prepare --out folder)")
    p.add_argument("--world-size", type=int, help="default: from the plan")
    p.add_argument("--model", help="elastic peer: the Hugging Face folder or .gguf file it prepares its shards from")
    p.add_argument("--listen", help="elastic peer: HOST:PORT of its control port (masters' --peers)")
    p.add_argument("--name", default="", help="elastic peer: how masters name it (default: its address)")
    p.add_argument("--profile", help="elastic peer: a device profile (name or .toml) it advertises: its memory "
                                     "bandwidth sets its share, its memory the budget")
    p.add_argument("--max-memory", metavar="SIZE", help="elastic peer: the memory it offers (default: the "
                                                        "profile's; none: no budget)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="elastic peer: where its shards are cached")
    p.add_argument("--advertise", metavar="NAME", default="", help="elastic peer: advertise it on the local network "
                   "(DNS-SD over multicast DNS) under NAME, with its CURVE public key and profile (measured when "
                   "--profile is not given), for masters that --discover")
    comm(p)

    p = sub.add_parser("generate", help="generate text across N ranks (starts local workers unless --peers)")
    p.add_argument("--model", help="Hugging Face folder (config.json + *.safetensors) or a .gguf file")
    p.add_argument("--shards", help="a prepared folder (instead of --model)")
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--weights", help="per-rank shares, e.g. 1,1,2 (default equal)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-ids", help="comma-separated stop token ids (default: the model's eos ids)")
    p.add_argument("--ignore-eos", action="store_true", help="no stop tokens")
    p.add_argument("--peers", help="HOST:PORT,... of elastic peers (`tp worker --model --listen`): the group is "
                                   "formed over them and survives losing one; default: start ranks here on loopback")
    p.add_argument("--discover", type=int, metavar="N", help="form the group from the first N elastic peers "
                   "advertised on the local network (`tp worker --advertise`) instead of --peers")
    p.add_argument("--discover-timeout-s", type=float, default=10.0)
    p.add_argument("--known-peers", help="with --discover: file of peer keys recorded by --trust-on-first-use "
                   "(default: known_tp_peers beside --cache-dir)")
    p.add_argument("--trust-on-first-use", action="store_true", help="with --discover: accept (and record) the "
                   "key of a peer name not seen before; a recorded name whose key changed is still refused")
    p.add_argument("--profile", help="with --peers / --discover: this device's profile (name or .toml) for the shares")
    p.add_argument("--master", help="HOST:PORT to bind (default: a free loopback port; with --peers 0.0.0.0:29500)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where prepared shards are cached")
    p.add_argument("--max-rank-memory", metavar="SIZE", help="with --model: prepare for this budget per rank "
                   "(as tp prepare does); --json then reports each rank's peak against it")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    weight_format(p)
    comm(p)

    p = sub.add_parser("keys", help="make ZeroMQ CURVE key pairs for master and workers")
    p.add_argument("--out", required=True)


def weight_format(p) -> None:
    p.add_argument("--quantize", choices=("int8", "int8g", "int4"), help="store the weights int8 (one scale per "
                   "output channel), int8g (int8, one scale per group of input columns: a GGUF's Q8_0 kept as it is) "
                   "or int4 (per group of input columns); embeddings and LM head as int8 rows (default: as the checkpoint)")
    p.add_argument("--group-size", type=int, default=32, help="int8g / int4 group size: 32, 64, 128 or 256")


def _quantize(args):
    """--quantize / --group-size as a split.llama.quantize handler (None: float weights)."""
    from split.llama.quantize import handler
    return handler(args.quantize, args.group_size) if args.quantize else None


def main(args) -> int:
    try:
        if args.tp_command == "prepare":
            return _prepare(args)
        if args.tp_command == "worker":
            return _worker(args)
        if args.tp_command == "generate":
            return _generate(args)
        if args.tp_command == "keys":
            from .curve import make_keys
            d = make_keys(args.out)
            print(f"wrote {d}/master.key(_secret) and {d}/worker.key(_secret): give workers master.key and "
                  f"worker.key_secret, the master master.key_secret and worker.key")
            return 0
    except (OSError, ValueError) as err:
        print(f"edge-runtime tp {args.tp_command}: {err}", file=sys.stderr)
        return 2
    raise AssertionError(args.tp_command)


def _config(args, world_size: int, master: str):
    """The parsed options every rank of the group shares."""
    from .config import TPConfig
    return TPConfig(world_size=world_size, master=master, backend=args.backend, payload=args.payload,
                    window=args.window, timeout_s=args.timeout_s, join_timeout_s=args.join_timeout_s, dtype=args.dtype,
                    curve_keys=Path(args.curve_keys) if args.curve_keys else None, insecure=args.insecure)


def _ids(text: str, field: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{field}: expected comma-separated integers, got {text!r}") from None


# --------------------------------------------------------------------------- prepare / worker

def _budget(args) -> int | None:
    from .budget import parse_bytes
    return parse_bytes(args.max_rank_memory) if args.max_rank_memory else None


def _prepare(args) -> int:
    from .budget import plan_windows
    from .plan import parse_weights
    from .prepare import prepare

    if args.weights_from:
        from devices.profiles import share_weights
        weights = share_weights([p.strip() for p in args.weights_from.split(",")], world_size=args.world_size)
    else:
        weights = parse_weights(args.weights, args.world_size)
    from .gguf_source import DEFAULT_GGUF_CACHE, model_folder

    model = model_folder(args.model, DEFAULT_GGUF_CACHE)  # a .gguf: its small model folder, made once
    plan = prepare(model, args.world_size, weights, args.out, max_rank_memory=_budget(args), quantize=_quantize(args),
                   dtype=args.dtype)
    print(json.dumps({"out": str(args.out), "kv_heads": plan.kv_heads, "mlp": plan.mlp, "windows": plan_windows(plan),
                      "max_rank_memory": plan.extra.get("max_rank_memory"), "quantize": plan.extra.get("quantize")}))
    return 0


def _worker(args) -> int:
    from .collective import CollectiveError
    from .engine import run_worker
    from .launch import join_as_worker, rank_folder
    from .plan import ShardPlan

    if (args.model is None) != (args.listen is None) or (args.model is None) == (args.shards is None):
        raise ValueError("give either --model and --listen (an elastic peer) or --rank, --master and --shards")
    if args.model is not None:
        return _peer(args)
    if args.rank is None or args.master is None:
        raise ValueError("--shards needs --rank and --master")
    if args.rank == 0:
        raise ValueError("--rank: workers are ranks 1..N-1 (rank 0 is the master, `tp generate`)")
    folder = rank_folder(Path(args.shards), args.rank)
    world_size = args.world_size if args.world_size is not None else ShardPlan.load(folder / "plan.json").world_size
    config = _config(args, world_size, args.master)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally-blocks close the sockets
    try:
        collective = join_as_worker(folder, args.rank, config)
    except CollectiveError as err:
        print(f"edge-runtime tp worker: {err}", file=sys.stderr)
        return 1
    return run_worker(folder, collective, config.window, log=lambda m: print(m, file=sys.stderr),
                      dtype=config.torch_dtype)


def _profile(name: str | None, max_memory: str | None = None) -> dict:
    from .budget import parse_bytes
    from .group import rank_profile
    return rank_profile(name, parse_bytes(max_memory, "--max-memory") if max_memory else None)


def _peer(args) -> int:
    from .peer import PeerSetup, serve_peer

    setup = PeerSetup(model=Path(args.model), listen=args.listen, cache_dir=Path(args.cache_dir), name=args.name,
                      profile=_profile(args.profile, args.max_memory),
                      curve_keys=Path(args.curve_keys) if args.curve_keys else None, insecure=args.insecure,
                      join_timeout_s=args.join_timeout_s, advertise=args.advertise)
    host = setup.listen.rpartition(":")[0].strip("[]")
    if setup.curve_keys is None and not setup.insecure and not is_loopback(host):
        raise ValueError(f"--listen {setup.listen} reaches beyond this machine: give --curve-keys (`tp keys`) or, "
                         "on a network you trust, --insecure")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally-blocks close the sockets
    return serve_peer(setup, log=lambda m: print(m, file=sys.stderr, flush=True))


# --------------------------------------------------------------------------- generate

def _generate(args) -> int:
    from split.llama import Sampling

    if (args.model is None) == (args.shards is None):
        raise ValueError("give exactly one of --model HF_DIR or --shards PREPARED_DIR")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.peers is not None or args.discover is not None:
        return _generate_in_group(args, sampling)
    return _generate_local(args, sampling)


def _generate_local(args, sampling) -> int:
    """Ranks 1..N-1 started here on loopback over shards prepared (and cached) for a fixed plan."""
    from .launch import LocalWorkers, cached_shards, free_port, share_cores, start_master
    from .plan import ShardPlan, parse_weights

    if args.shards:
        if args.max_rank_memory or args.quantize:
            raise ValueError("--max-rank-memory and --quantize go with --model (a prepared folder has its budget "
                             "and weight format: tp prepare)")
        shards = Path(args.shards)
        world_size = ShardPlan.load(shards / "plan.json").world_size
        if args.world_size is not None and args.world_size != world_size:
            raise ValueError(f"--world-size {args.world_size} does not match the prepared plan ({world_size})")
    else:
        world_size = args.world_size if args.world_size is not None else 1
        weights = parse_weights(args.weights, world_size)
        shards = cached_shards(Path(args.model), world_size, weights, Path(args.cache_dir), not args.json,
                               _budget(args), _quantize(args), dtype=args.dtype)
    config = _config(args, world_size, args.master or (f"127.0.0.1:{free_port()}" if world_size > 1 else ""))
    workers = LocalWorkers(shards, config) if world_size > 1 else None
    if workers is not None and "OMP_NUM_THREADS" not in os.environ:
        share_cores(world_size)
    failed = True
    try:
        code = _run(args, lambda: start_master(shards, config), config, sampling,
                    lambda: workers.describe_failures() if workers else "")
        failed = code != 0
        return code
    finally:
        if workers is not None:
            workers.stop(grace_s=0.5 if failed else 5.0)


def _generate_in_group(args, sampling) -> int:
    """An elastic group over already-running peers, listed or discovered (group.py)."""
    from .group import Discovery, Group

    if args.model is None:
        raise ValueError("--peers / --discover need --model (every peer prepares its part of whatever plan the "
                         "group takes)")
    if args.world_size is not None or args.weights:
        raise ValueError("--peers / --discover: the world size is 1 + the peers that answer, and the shares come "
                         "from their profiles: drop --world-size / --weights")
    if args.peers is not None and args.discover is not None:
        raise ValueError("give --peers or --discover, not both")
    if args.discover is not None:
        if args.discover < 1:
            raise ValueError(f"--discover must be >= 1, got {args.discover}")
        known = Path(args.known_peers) if args.known_peers else Path(args.cache_dir).parent / "known_tp_peers"
        peers = Discovery(args.discover, args.discover_timeout_s, known, args.trust_on_first_use)
        world = 1 + args.discover
    else:
        peers = [p.strip() for p in args.peers.split(",") if p.strip()]
        world = 1 + len(peers)
    config = _config(args, world, args.master or "0.0.0.0:29500")
    return _run(args, lambda: Group(Path(args.model), peers, config, quantize=_quantize(args),
                                    cache_dir=Path(args.cache_dir), profile=_profile(args.profile),
                                    progress=not args.json, log=lambda m: print(m, file=sys.stderr, flush=True)),
                config, sampling, lambda: "")


def _run(args, start, config, sampling, failures) -> int:
    """Start the engine (an engine.Master or a group.Group), generate, print text or one JSON object."""
    import torch

    from split.llama import Stop

    from .budget import plan_windows
    from .collective import CollectiveError

    engine = None
    try:
        engine = start()
        stop_ids = [] if args.ignore_eos else (_ids(args.stop_ids, "--stop-ids") if args.stop_ids
                                               else list(engine.config.eos_token_ids))
        prompt = _ids(args.prompt_ids, "--prompt-ids") if args.prompt_ids is not None else engine.encode(args.prompt)
        t0 = time.perf_counter()
        tokens, shown = [], ""
        for tok in engine.generate(prompt, args.max_new_tokens, sampling, Stop(eos_ids=stop_ids)):
            tokens.append(tok)
            if not args.json:  # decode the whole text so far: tokens that merge (spaces, UTF-8) print right
                text = engine.decode(tokens) if engine.tokenizer else " ".join(map(str, tokens)) + " "
                print(text[len(shown):] if text.startswith(shown) else text, end="", flush=True)
                shown = text
        total = time.perf_counter() - t0
        ranks = engine.rank_stats()
        plan = engine.plan
    except (CollectiveError, TimeoutError, RuntimeError) as err:
        extra = failures()
        print(f"\nedge-runtime tp generate: failed: {err}" + (f" [{extra}]" if extra else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nedge-runtime tp generate: interrupted", file=sys.stderr)
        return 130
    finally:
        if engine is not None:
            engine.close()
    s, world_size = engine.last, plan.world_size
    lat = s.token_latencies_s
    result = dict(
        token_ids=s.tokens, finish_reason=s.finish_reason, text=engine.decode(s.tokens) if engine.tokenizer else None,
        prompt_ids=prompt, world_size=world_size, backend=config.backend,
        windows=plan_windows(plan) if config.window is None else [config.window] * world_size,
        payload=config.payload, kv_heads=plan.kv_heads, mlp=plan.mlp, dtype=config.dtype,
        quantize=plan.extra.get("quantize"),
        time_to_first_token_s=s.time_to_first_token_s, token_latencies_s=lat,
        mean_token_latency_s=sum(lat) / len(lat) if lat else None, total_s=total,
        tokens_per_s=len(s.tokens) / total if total > 0 else None,
        peak_rss_bytes=[r["peak_rss"] for r in ranks], baseline_rss_bytes=[r["baseline_rss"] for r in ranks],
        bytes_sent=[r["bytes_sent"] for r in ranks], bytes_received=[r["bytes_received"] for r in ranks],
        pager=[dict(loads=r["pager_loads"], max_resident=r["pager_max_resident"], load_s=r["pager_load_us"] / 1e6,
                    wait_s=r["pager_wait_us"] / 1e6, bytes_loaded=r["pager_bytes_loaded"]) for r in ranks],
        torch_threads=torch.get_num_threads())
    if hasattr(engine, "describe"):
        result["group"] = engine.describe()
    result["window"] = result["windows"][0]
    budget = plan.extra.get("max_rank_memory")
    if budget is not None:  # each rank's peak against the budget it was prepared for
        result["max_rank_memory_bytes"] = budget
        result["within_budget"] = [r["peak_rss"] - r["baseline_rss"] <= budget for r in ranks]
    if args.json:
        print(json.dumps(result))
    else:
        mib = [f"{b / 2**20:.0f}" for b in result["peak_rss_bytes"]]
        print(f"\n[{len(tokens)} tokens, first after {s.time_to_first_token_s * 1e3:.0f} ms, "
              f"{result['tokens_per_s']:.1f} tokens/s, peak RSS MiB per rank {mib}]", file=sys.stderr)
    return 0
