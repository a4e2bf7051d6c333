"""`edge-runtime generate` and `edge-runtime calibrate`: the collaborative LLM from the command line.

    edge-runtime generate --model runs/ee_lm --mode collaborative --cloud 127.0.0.1:8001 \\
        --threshold 0.6 --prompt "ROMEO:" --max-new-tokens 48 [--catch-up propagated] [--json]
    edge-runtime generate --model runs/ee_lm --mode standalone --prompt "ROMEO:"
    edge-runtime generate --model runs/ee_lm --mode cloud-only --cloud 127.0.0.1:8001 --prompt "ROMEO:"
    edge-runtime generate --model runs/ee_lm --mode cloud-stream --cloud 127.0.0.1:8001 --prompt "ROMEO:" \
        [--temperature 0.8 --top-p 0.95 --seed 7] [--stop-ids 13,13]
    edge-runtime generate --model runs/ee_lm --mode speculative --cloud 127.0.0.1:8001 --prompt "ROMEO:" \
        [--gamma 4] [--temperature 0.8 --seed 7] [--stop-ids 13,13] [--json]
    edge-runtime generate --model runs/ee_lm --mode auto --cloud 127.0.0.1:8001 --link-rate-mbit 10 --prompt "ROMEO:"
    edge-runtime generate --model runs/ee_lm --cloud 127.0.0.1:8001 --quantize int4 --group-size 32 --prompt "ROMEO:"
    edge-runtime calibrate --model runs/ee_lm --eval-text val.txt --max-ppl-increase 0.02

The cloud serves the `llm_continuation` backend: --cloud-model (layers [k, L), default "llm"; a
model with catch_up = "propagated" is typically named "llm_prop") and --cloud-full-model (k = 0,
for cloud-only and speculative; default "llm_full"); a --cloud-model with catch_up = "tokens" gets
token ids instead of states (the device reads that from the model's metadata). --mode cloud-stream
asks the cloud's `llm_stream` model (--cloud-stream-model) to generate the whole answer and stream
it back (collab/stream.py); the device only tokenizes. --mode speculative drafts up to --gamma
tokens per round with the exit head and has the full model verify them in one call
(collab/speculative.py; --json adds drafted and accepted counts). --mode auto measures the round
trip, the device's and the cloud's step and picks the mode predicted fastest (collab/auto.py; --json
adds every mode's prediction and what it measured); greedy, lossless modes unless --max-ppl-increase. The sampling flags (--temperature,
--top-k, --top-p, --seed) and --stop-ids apply to these two modes. Without --threshold, generate
uses the one `calibrate` wrote into the model's exits.json. --quantize runs the device half
(embeddings + layers [0, k)) from int8 / int4 blocks prepared once into the `tp` cache
(${EDGEFOLD_CACHE:-~/.cache/edgefold}/tp-shards; collab/quantized.py); the exit head stays float.
Exit status: 0 done (also when degraded: see "degraded" in --json), 1 the cloud refused a request,
2 bad arguments or files. torch is imported only inside run().
"""
import json
import math
import sys


def add_parser(commands) -> None:
    g = commands.add_parser("generate", help="collaborative LLM generation (edge exit head + cloud)")
    g.add_argument("--model", required=True, help="HF folder with exits.json + exit_heads.safetensors")
    g.add_argument("--mode", choices=("standalone", "collaborative", "cloud-only", "cloud-stream", "speculative", "auto"),
                   default="collaborative")
    g.add_argument("--link-rate-mbit", type=float, default=10.0, help="auto: the link's rate (the round trip is measured)")
    g.add_argument("--max-ppl-increase", type=float, default=0.0,
                   help="auto: the quality loss a lossy mode may cost (calibrated; 0 = lossless modes only)")
    g.add_argument("--gamma", type=int, default=4, help="speculative: the most drafts per verification (adapted)")
    g.add_argument("--cloud", help="HOST:PORT of the cloud-service")
    g.add_argument("--threshold", type=float, help="emit at the edge when confidence >= T (default: calibrated)")
    g.add_argument("--metric", choices=("max_prob", "entropy"), default="max_prob")
    g.add_argument("--exit-layer", type=int, help="k (default: the deepest exit in exits.json)")
    g.add_argument("--cloud-model", default="llm")
    g.add_argument("--cloud-full-model", default="llm_full")
    g.add_argument("--cloud-stream-model", default="llm_stream", help="the cloud's streaming model (cloud-stream)")
    g.add_argument("--temperature", type=float, default=0.0, help="cloud-stream, speculative: 0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="cloud-stream, speculative: 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="cloud-stream, speculative: 1 = off")
    g.add_argument("--seed", type=int, help="cloud-stream, speculative: the sampling seed (default: a fresh one)")
    g.add_argument("--stop-ids", action="append", default=[], metavar="ID,ID,...",
                   help="cloud-stream, speculative: a stop sequence of token ids (repeatable)")
    g.add_argument("--wire", choices=("int8", "fp16", "fp32"), default="int8")
    g.add_argument("--timeout-s", type=float, default=5.0)
    g.add_argument("--max-kept-states", type=int, default=4096, help="memory cap on unacknowledged states")
    g.add_argument("--quantize", choices=("int8", "int4"), help="device half from int8 / int4 blocks (default: float)")
    g.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128 or 256)")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text (needs tokenizer.json in --model)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--json", action="store_true")

    c = commands.add_parser("calibrate", help="pick the exit threshold on held-out text for a quality target")
    c.add_argument("--model", required=True)
    c.add_argument("--eval-text", required=True)
    c.add_argument("--metric", choices=("max_prob", "entropy"), default="max_prob")
    c.add_argument("--exit-layer", type=int)
    target = c.add_mutually_exclusive_group()
    target.add_argument("--max-ppl-increase", type=float, default=0.02, help="e.g. 0.02 = at most +2%% perplexity")
    target.add_argument("--min-agreement", type=float, help="e.g. 0.97 = top-1 agreement with the full model")
    c.add_argument("--max-tokens", type=int, default=8192, help="evaluate on at most this many tokens")
    c.add_argument("--context", type=int, default=256)


def _tokenizer(model_dir):
    from pathlib import Path

    from tokenizers import Tokenizer
    file = Path(model_dir) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}; pass --prompt-ids instead")
    return Tokenizer.from_file(str(file))


def run(args) -> int:
    import grpc
    try:
        if args.command == "calibrate":
            return _calibrate(args)
        return _generate(args)
    except grpc.RpcError as err:
        print(f"edge-runtime {args.command}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as err:
        print(f"edge-runtime {args.command}: {err}", file=sys.stderr)
        return 2


def resolve_threshold(model, threshold: float | None, metric: str, exit_layer: int | None, mode: str) -> float:
    """`threshold`, or the one `calibrate` wrote into the model's exits.json for this metric and exit."""
    from split.llama.exits import read_exits_json

    if threshold is not None:
        return threshold
    meta = read_exits_json(model)
    k = exit_layer or max(meta["exit_layers"])
    calibrated = meta.get("threshold", {}).get(metric)
    if calibrated is not None and calibrated.get("exit_layer", k) != k:
        calibrated = None
    if calibrated is None and mode == "collaborative":
        raise ValueError(f"no threshold given and no calibrated {metric} threshold for exit layer {k} in "
                         f"{model}/exits.json; run `edge-runtime calibrate` first")
    return calibrated["value"] if calibrated else 0.5


def _prompt(args):
    """(tokenizer or None, prompt ids)."""
    if args.prompt is not None:
        tok = _tokenizer(args.model)
        return tok, tok.encode(args.prompt).ids
    return None, [int(x) for x in args.prompt_ids.split(",") if x.strip()]


def _sampling_and_stop(args):
    """(Sampling, stop sequences) from the sampling flags and --stop-ids."""
    from split.llama.sampling import Sampling

    stop = [[int(x) for x in seq.split(",") if x.strip()] for seq in args.stop_ids]
    if any(not seq for seq in stop):
        raise ValueError("--stop-ids: each stop sequence needs at least one token id")
    return Sampling(args.temperature, args.top_k, args.top_p, args.seed), stop


def _generate(args) -> int:
    if args.mode == "cloud-stream":
        return _cloud_stream(args)
    if args.mode == "auto":
        return _auto(args)
    from edge_runtime.collab.device import CollabLlm
    from split.llama import Stop

    sampled = (args.temperature, args.top_k, args.top_p, args.seed, args.stop_ids) != (0.0, 0, 1.0, None, [])
    if sampled and args.mode != "speculative":
        raise ValueError("--temperature, --top-k, --top-p, --seed and --stop-ids apply to --mode cloud-stream "
                         "and speculative only")
    sampling, stop = _sampling_and_stop(args)
    threshold = resolve_threshold(args.model, args.threshold, args.metric, args.exit_layer, args.mode)
    tok, ids = _prompt(args)
    edge = CollabLlm(args.model, mode=args.mode, cloud=args.cloud, threshold=threshold, metric=args.metric,
                     exit_layer=args.exit_layer, cloud_model=args.cloud_model,
                     cloud_full_model=args.cloud_full_model, wire=args.wire, timeout_s=args.timeout_s,
                     max_kept_states=args.max_kept_states, quantize=args.quantize, group_size=args.group_size,
                     gamma=args.gamma)
    try:
        stream = not args.json and tok is not None

        def show(step, token, source):
            if stream:
                print(tok.decode([token]), end="", flush=True)

        if stream:
            print(args.prompt, end="", flush=True)
        result = edge.generate(ids, args.max_new_tokens, Stop(sequences=stop), on_token=show, sampling=sampling)
    finally:
        edge.close()
    text = tok.decode(result.tokens) if tok is not None else None
    if args.json:
        n = len(result.tokens)
        print(json.dumps({"mode": args.mode, "threshold": threshold, "exit_layer": edge.k, "tokens": result.tokens,
                          "text": text, "sources": result.sources, "degraded": result.degraded,
                          "edge_fraction": result.counters.edge_tokens / max(n, 1),
                          "ms_per_token": 1e3 * sum(result.seconds_per_token) / max(n, 1),
                          "counters": result.counters.as_dict()}))
    elif stream:
        print()
        if result.degraded:
            print(f"[degraded: {result.sources.count('degraded')} token(s) decided on the device while the "
                  "cloud was unreachable]", file=sys.stderr)
    else:
        print(" ".join(map(str, result.tokens)))
    return 0


def _auto(args) -> int:
    """Measure, choose, run; the choice and every prediction go into --json."""
    from edge_runtime.collab.auto import AutoLlm
    from edge_runtime.collab.device import CollabLlm
    from split.llama import Stop

    sampling, stop = _sampling_and_stop(args)
    if not sampling.greedy or args.seed is not None:
        raise ValueError("--mode auto decodes greedily: --temperature, --top-k, --top-p and --seed do not apply")
    threshold = resolve_threshold(args.model, args.threshold, args.metric, args.exit_layer, args.mode)
    tok, ids = _prompt(args)
    edge = CollabLlm(args.model, mode="speculative", cloud=args.cloud, threshold=threshold, metric=args.metric,
                     exit_layer=args.exit_layer, cloud_model=args.cloud_model, cloud_full_model=args.cloud_full_model,
                     wire=args.wire, timeout_s=args.timeout_s, max_kept_states=args.max_kept_states,
                     quantize=args.quantize, group_size=args.group_size, gamma=args.gamma)
    try:
        auto = AutoLlm(edge, args.link_rate_mbit, args.max_ppl_increase, args.cloud_stream_model, args.cloud_full_model)
        result = auto.generate(ids, args.max_new_tokens, Stop(sequences=stop))
    finally:
        edge.close()
    n, text = len(result.tokens), tok.decode(result.tokens) if tok is not None else None
    if args.json:
        print(json.dumps({"mode": "auto", "chose": result.mode, "gamma": result.choice.gamma,
                          "predicted_ms_per_token": 1e3 * result.choice.predicted_s_per_token,
                          "predictions": [{"mode": r.mode, "ms_per_token": 1e3 * r.seconds_per_token,
                                           "cloud_layer_evals_per_token": r.cloud_layer_evals_per_token,
                                           "ppl_increase": r.ppl_increase if math.isfinite(r.ppl_increase) else None,
                                           "allowed": r.allowed, "gamma": r.gamma}
                                          for r in result.choice.rows],
                          "observed": {k: v if not isinstance(v, float) or math.isfinite(v) else None
                                       for k, v in result.observed.__dict__.items()},
                          "tokens": result.tokens, "text": text,
                          "sources": result.sources, "degraded": result.degraded,
                          "ms_per_token": 1e3 * sum(result.seconds_per_token) / max(n, 1), "counters": result.counters}))
    else:
        print(f"[auto: {result.mode}]", file=sys.stderr)
        print(args.prompt + text if text is not None and args.prompt is not None else " ".join(map(str, result.tokens)))
    return 0


def _cloud_stream(args) -> int:
    """The cloud generates the whole answer; tokens are printed as they arrive."""
    from edge_runtime.collab.stream import CloudStream

    sampling, stop = _sampling_and_stop(args)
    tok, ids = _prompt(args)
    show = not args.json and tok is not None
    if show:
        print(args.prompt, end="", flush=True)
    with CloudStream(args.cloud, args.cloud_stream_model, args.timeout_s) as cloud:
        result = cloud.generate(ids, args.max_new_tokens, sampling, stop, on_token=lambda step, token, source: (
            print(tok.decode([token]), end="", flush=True) if show else None))
    n = len(result.tokens)
    if args.json:
        print(json.dumps({"mode": args.mode, "tokens": result.tokens,
                          "text": tok.decode(result.tokens) if tok is not None else None,
                          "sources": result.sources, "finish_reason": result.finish_reason, "degraded": False,
                          "bytes_sent": result.bytes_sent, "bytes_received": result.bytes_received,
                          "round_trips": result.round_trips, "cloud_layer_evals": result.cloud_layer_evals,
                          "time_to_first_token_ms": 1e3 * (result.time_to_first_token_s or 0.0),
                          "ms_per_token": 1e3 * sum(result.seconds_per_token) / max(n, 1),
                          "batch_streams": result.batch_streams}))
    elif show:
        print()
    else:
        print(" ".join(map(str, result.tokens)))
    return 0


def _calibrate(args) -> int:
    from pathlib import Path

    from split.llama.calibrate import calibrate_threshold
    text = Path(args.eval_text).read_text(encoding="utf-8")
    ids = _tokenizer(args.model).encode(text).ids[: args.max_tokens]
    report = calibrate_threshold(args.model, ids, metric=args.metric, exit_layer=args.exit_layer,
                                 max_ppl_increase=None if args.min_agreement is not None else args.max_ppl_increase,
                                 min_agreement=args.min_agreement, context=args.context, write=True)
    print(json.dumps(report))
    return 0
