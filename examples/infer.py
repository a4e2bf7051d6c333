"""One inference through the app SDK: connect, infer, close. The same code talks to the deploy
agent on this device (`make demo` starts one on 8011) or to the cloud (8001).

    python examples/infer.py --target 127.0.0.1:8011 [--model mlp] [--token-file token] [--text "..."]

Each model input is shaped from the model's metadata (a variable dimension, such as the batch,
becomes 1): a fixed-seed random tensor, or `--text` for a BYTES input (a prompt). Prints one line
per output: `name dtype [shape] [values]`.
"""
import argparse
import sys

import numpy as np

from edge_runtime.client import sdk
from edgefold_proto.tensors import DTYPES

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--target", default="127.0.0.1:8011", help="the agent or the cloud, host:port")
parser.add_argument("--model", default="mlp")
parser.add_argument("--token-file", help="file holding the bearer token, for a server that wants one")
parser.add_argument("--text", default="To be, or not to be", help="the value of a BYTES input")
args = parser.parse_args()


def example_input(spec: sdk.TensorSpec, rng: np.random.Generator) -> np.ndarray:
    shape = [max(d, 1) for d in spec.shape]
    if spec.datatype == "BYTES":
        return np.full(shape, args.text.encode(), dtype=object)
    return rng.standard_normal(shape).astype(DTYPES[spec.datatype])


rng = np.random.default_rng(0)
try:
    with sdk.connect(args.target, token_file=args.token_file) as client:
        inputs = {spec.name: example_input(spec, rng) for spec in client.metadata(args.model).inputs}
        outputs = client.infer(args.model, inputs)
except sdk.EdgefoldError as err:          # every SDK failure: Unavailable, NotFound, InvalidInput, ...
    sys.exit(f"infer.py: {type(err).__name__}: {err.details()}")
for name, value in outputs.items():
    print(name, value.dtype, list(value.shape), value.tolist())
