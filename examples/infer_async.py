"""Several concurrent requests through the asyncio client of the app SDK (asyncio.gather over one
connection), against the deploy agent on this device or the cloud.

    python examples/infer_async.py --target 127.0.0.1:8011 [--model mlp] [--requests 8] [--token-file token]

Request i sends fixed-seed random inputs (seed i, shaped from the model's metadata), so request 0
sends what examples/infer.py sends. Prints one line per request, then the wall time of all of them.
"""
import argparse
import asyncio
import sys
import time

import numpy as np

from edge_runtime.client import sdk
from edgefold_proto.tensors import DTYPES


def random_inputs(specs, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal([max(d, 1) for d in s.shape]).astype(DTYPES[s.datatype]) for s in specs}


async def main(args) -> None:
    async with sdk.connect_async(args.target, token_file=args.token_file) as client:
        specs = (await client.metadata(args.model)).inputs
        start = time.perf_counter()
        results = await asyncio.gather(*(client.infer(args.model, random_inputs(specs, i))
                                         for i in range(args.requests)))
        elapsed = time.perf_counter() - start
    for i, outputs in enumerate(results):
        print(f"request {i}:", "; ".join(f"{n} {v.dtype} {list(v.shape)} {v.tolist()}" for n, v in outputs.items()))
    print(f"{args.requests} concurrent requests in {elapsed * 1e3:.1f} ms")


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--target", default="127.0.0.1:8011", help="the agent or the cloud, host:port")
parser.add_argument("--model", default="mlp")
parser.add_argument("--requests", type=int, default=8)
parser.add_argument("--token-file", help="file holding the bearer token, for a server that wants one")
try:
    asyncio.run(main(parser.parse_args()))
except sdk.EdgefoldError as err:
    sys.exit(f"infer_async.py: {type(err).__name__}: {err.details()}")
