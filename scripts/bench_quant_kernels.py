"""Time one-token GEMVs on PyTorch's CPU kernels: fp32 / bf16 F.linear against weight-only int8 / int8g / int4.

    .venv/bin/python scripts/bench_quant_kernels.py --out runs/bench_quant_kernels.jsonl
    .venv/bin/python scripts/bench_quant_kernels.py --shapes 2048x2048,5632x2048 --tokens 1,16 --groups 32 \
        --kernels bf16,int8,int4,int8g   # every kernel, one after the other
    .venv/bin/python scripts/bench_quant_kernels.py --shapes 2048x2048,5632x2048 --tokens 1,16 --rounds 30
        # the int8 / int8-g32 / int4-g32 table of split/llama/quantize.py's docstring

For each weight shape (out x in; default 2816x1024 and 5632x2048, the MLP of a 336M- and a 1.1B-shape
Llama) and each kernel, prints one JSON object: the median ms of one call y = x @ W^T with x of shape
(tokens, in) for each of --tokens, over --iters calls, with the weights either "warm" (the same matrix every call) or
"cold" (rotating through copies that hold at least --cold-mib MiB, so each call reads its weight
from memory, as a decoder step does), and the fastest call (ms_min). Two threads on a 2-core machine
shared with other work stall whenever one thread is descheduled (medians then sit on multiples of
the 4 ms scheduler tick): each row records the 1-minute load average; trust rows taken at load < 2.
Kernels:
- fp32 / bf16: F.linear with an fp32 / bf16 weight and activation (the baseline, measured in this run);
- int8: torch.ops.aten._weight_int8pack_mm (int8 (out, in) weight, one scale per output row),
  with fp32 and with bf16 activations (scales in the activation's dtype);
- int4 g{32,64,128}: torch.ops.aten._weight_int4pack_mm_for_cpu on the weight packed by
  _convert_weight_to_int4pack_for_cpu, group-wise scales and zeros, fp32 and bf16 activations;
- int8g g{32,..}: group-wise int8 (one scale per group, GGUF q8_0 at 32) on that int4 kernel, each code
  as two nibbles (split.llama.quant_kernels.pack_int8_groups: [x | x] against (out, 2 in)), bf16
  activations, the concatenation included; and, for comparison, the same weight dequantized to bf16
  on every call and multiplied by F.linear ("int8g g32 dequantize + bf16 F.linear");
- int8 / int8-g32 / int4-g32 module: WeightOnlyInt8Linear / WeightOnlyInt8GroupLinear /
  WeightOnlyInt4Linear as quantize_model swaps them in (fp32 activation in and out, bf16 for the
  kernel: the casts included).
--kernels keeps only the kernels whose name starts with one of its words (bf16 also keeps the fp32
baseline the speed-ups are against).
With --rounds N, instead: the modules of int8, int8-g32 and int4-g32 (--groups' first) timed in N
interleaved rounds (each round: 15 calls of each, warm, median kept), so that other work on the
machine slows them alike; one "rounds" row per shape, tokens and scheme: the median and the fastest
of the round medians.
Also one "pack" row per shape and scheme: ms to build the kernel's tensors from the stored format
(what a loader or pager pays once per weight). Speed-up columns are against fp32 F.linear, same
shape and cache state. Other work on the machine (a second engineer's tests) may run beside it.
"""
import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from split.llama.quantize import Int4, Int8, Int8Group


def timed(fn, args_list, iters: int) -> tuple[float, float]:
    """(median, min) ms of fn(*args) over `iters` calls, cycling through args_list."""
    for a in args_list[: min(len(args_list), 8)]:
        fn(*a)  # warm-up (and first-call dispatch)
    times = []
    for i in range(iters):
        a = args_list[i % len(args_list)]
        t0 = time.perf_counter()
        fn(*a)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def kernels(w: torch.Tensor, groups):
    """name -> (activation dtype, weight-bytes, make(w) -> args tail, fn(x, *tail))."""
    out = {
        "fp32 F.linear": (torch.float32, lambda w: (w.float(),), F.linear),
        "bf16 F.linear": (torch.bfloat16, lambda w: (w.bfloat16(),), F.linear),
    }
    int8 = Int8()
    for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out[f"int8 ({tag} input)"] = (dt, lambda w, dt=dt: int8.kernel_tensors(int8.quantize(w), dt),
                                      torch.ops.aten._weight_int8pack_mm)
    for g in groups:
        h = Int4(g)
        for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            out[f"int4 g{g} ({tag} input)"] = (
                dt, lambda w, h=h, dt=dt: h.kernel_tensors(h.quantize(w), dt),
                lambda x, packed, sz, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz))
    for g in groups:
        h = Int8Group(g)
        out[f"int8g g{g} (bf16 input)"] = (torch.bfloat16, lambda w, h=h: h.kernel_tensors(h.quantize(w), torch.bfloat16),
                                           lambda x, packed, sz, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(
                                               torch.cat((x, x), dim=1), packed, g, sz))
    h = Int8Group(groups[0])
    out[f"int8g g{h.group_size} dequantize + bf16 F.linear"] = (
        torch.bfloat16, lambda w, h=h: tuple(h.quantize(w).values()),
        lambda x, q, s, g=h.group_size: F.linear(x, (q.view(q.shape[0], -1, g).to(torch.bfloat16) * s[..., None])
                                                 .view(q.shape)))
    # what quantize_model swaps in: fp32 x in, cast to bf16 for the kernel, fp32 y out
    for h in (int8, Int8Group(groups[0]), Int4(groups[0])):
        out[f"{h.name} module (fp32 in/out)"] = (torch.float32, lambda w, h=h: (h.module(h.quantize(w)),),
                                                 lambda x, mod: mod(x))
    return out


def rounds(w: torch.Tensor, group: int, token_counts, n_rounds: int, calls: int = 15):
    """{(tokens, scheme name): [median ms of each round]} for the int8 / int8g / int4 modules of w."""
    mods = {h.name: h.module(h.quantize(w)) for h in (Int8(), Int8Group(group), Int4(group))}
    out = {}
    with torch.inference_mode():
        for tokens in token_counts:
            x = torch.randn(tokens, w.shape[1])  # (tokens, in)
            for m in mods.values():
                timed(m, [(x,)], 10)
            for _ in range(n_rounds):
                for name, m in mods.items():
                    out.setdefault((tokens, name), []).append(timed(m, [(x,)], calls)[0])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="2816x1024,5632x2048", help="out x in, comma separated")
    p.add_argument("--groups", default="32,64,128")
    p.add_argument("--tokens", default="1", help="activation rows M, comma separated")
    p.add_argument("--kernels", default=None, help="only kernels whose name starts with one of these words "
                   "(comma separated; fp32 F.linear, the baseline, is always kept)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--cold-mib", type=float, default=256.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=0, help="time the int8 / int8g / int4 modules in this many "
                   "interleaved rounds instead of every kernel one after the other")
    p.add_argument("--out", default=None, help="also append the rows to this .jsonl file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    groups = [int(g) for g in args.groups.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]
    keep = tuple(k.strip() for k in args.kernels.split(",")) if args.kernels else None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sink = open(args.out, "a") if args.out else None

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    for shape in args.shapes.split(","):
        n_out, n_in = (int(v) for v in shape.split("x"))
        w = torch.randn(n_out, n_in) * 0.02  # (out, in)
        if args.rounds:
            for (tokens, name), ms in rounds(w, groups[0], token_counts, args.rounds).items():
                emit({"kind": "rounds", "shape": shape, "tokens": tokens, "scheme": name,
                      "ms": round(statistics.median(ms), 4), "ms_min": round(min(ms), 4), "rounds": args.rounds,
                      "threads": args.threads, "loadavg_1min": round(os.getloadavg()[0], 2)})
            continue
        base = {}
        for name, (dt, make, fn) in kernels(w, groups).items():
            if keep is not None and name != "fp32 F.linear" and not name.startswith(keep):
                continue
            tail = make(w)
            nbytes = sum(t.numel() * t.element_size() for t in tail if isinstance(t, torch.Tensor))
            nbytes += sum(t.numel() * t.element_size() for m in tail if isinstance(m, torch.nn.Module)
                          for t in m.buffers())
            copies = max(1, int(args.cold_mib * 2**20 // nbytes) + 1)
            tails = [tail] + [tuple(copy.deepcopy(t) for t in tail) for _ in range(copies - 1)]  # new memory
            for tokens in token_counts:
                x = torch.randn(tokens, n_in).to(dt)  # (tokens, in)
                with torch.inference_mode():
                    for cache, args_list in (("warm", [(x, *tail)]), ("cold", [(x, *t) for t in tails])):
                        ms, ms_min = timed(fn, args_list, args.iters)
                        base.setdefault((tokens, cache), ms)  # the first kernel is fp32 F.linear
                        emit({"kind": "gemv", "shape": shape, "tokens": tokens, "kernel": name,
                              "activation": str(dt).removeprefix("torch."), "cache": cache, "ms": round(ms, 4),
                              "ms_min": round(ms_min, 4), "speedup_vs_fp32": round(base[tokens, cache] / ms, 2),
                              "weight_bytes": nbytes, "threads": args.threads,
                              "loadavg_1min": round(os.getloadavg()[0], 2)})
            del tails
        for h in [Int8()] + [Int8Group(g) for g in groups] + [Int4(g) for g in groups]:
            stored = h.quantize(w)
            ms, _ = timed(lambda s: h.kernel_tensors(s, torch.bfloat16), [(stored,)], 5)
            emit({"kind": "pack", "shape": shape, "scheme": h.name, "ms": round(ms, 3),
                  "stored_bytes": sum(t.numel() * t.element_size() for t in stored.values()),
                  "threads": args.threads})
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
