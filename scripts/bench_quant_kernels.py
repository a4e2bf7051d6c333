"""Time one-token GEMVs on PyTorch's CPU kernels: fp32 / bf16 F.linear against weight-only int8 / int4.

    .venv/bin/python scripts/bench_quant_kernels.py --out runs/bench_quant_kernels.jsonl

For each weight shape (out x in; default 2816x1024 and 5632x2048, the MLP of a 336M- and a 1.1B-shape
Llama) and each kernel, prints one JSON object: the median ms of one call y = x @ W^T with x of shape
(--tokens, in), over --iters calls, with the weights either "warm" (the same matrix every call) or
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
- int8 / int4-g32 module: WeightOnlyInt8Linear / WeightOnlyInt4Linear as quantize_model swaps them in
  (fp32 activation in and out, bf16 for the kernel: the casts included).
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

from split.llama.quantize import Int4, Int8


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
    # what quantize_model swaps in: fp32 x in, cast to bf16 for the kernel, fp32 y out
    for h in (int8, Int4(groups[0])):
        out[f"{h.name} module (fp32 in/out)"] = (torch.float32, lambda w, h=h: (h.module(h.quantize(w)),),
                                                 lambda x, mod: mod(x))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="2816x1024,5632x2048", help="out x in, comma separated")
    p.add_argument("--groups", default="32,64,128")
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--cold-mib", type=float, default=256.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also append the rows to this .jsonl file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    groups = [int(g) for g in args.groups.split(",")]
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
        base = {}
        for name, (dt, make, fn) in kernels(w, groups).items():
            tail = make(w)
            nbytes = sum(t.numel() * t.element_size() for t in tail if isinstance(t, torch.Tensor))
            nbytes += sum(t.numel() * t.element_size() for m in tail if isinstance(m, torch.nn.Module)
                          for t in m.buffers())
            x = torch.randn(args.tokens, n_in).to(dt)  # (tokens, in)
            copies = max(1, int(args.cold_mib * 2**20 // nbytes) + 1)
            tails = [tail] + [tuple(copy.deepcopy(t) for t in tail) for _ in range(copies - 1)]  # new memory
            with torch.inference_mode():
                for cache, args_list in (("warm", [(x, *tail)]), ("cold", [(x, *t) for t in tails])):
                    ms, ms_min = timed(fn, args_list, args.iters)
                    base.setdefault(cache, ms)  # the first kernel is fp32 F.linear
                    emit({"kind": "gemv", "shape": shape, "tokens": args.tokens, "kernel": name,
                          "activation": str(dt).removeprefix("torch."), "cache": cache, "ms": round(ms, 4),
                          "ms_min": round(ms_min, 4), "speedup_vs_fp32": round(base[cache] / ms, 2),
                          "weight_bytes": nbytes, "threads": args.threads,
                          "loadavg_1min": round(os.getloadavg()[0], 2)})
            del tails
        for h in [Int8()] + [Int4(g) for g in groups]:
            stored = h.quantize(w)
            ms, _ = timed(lambda s: h.kernel_tensors(s, torch.bfloat16), [(stored,)], 5)
            emit({"kind": "pack", "shape": shape, "scheme": h.name, "ms": round(ms, 3),
                  "stored_bytes": sum(t.numel() * t.element_size() for t in stored.values()),
                  "threads": args.threads})
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
