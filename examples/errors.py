"""How an app handles the app SDK's typed errors: each failure below is provoked on purpose, caught
by its class, and answered the way an app would (fix the request, fall back to the device, ...).

    python examples/errors.py --target 127.0.0.1:8011 [--model mlp] [--token-file token]

Prints one line per attempt: `what: ErrorClass -> what the app does (server's message)`. A wrong
token is only refused by a server that checks tokens (the cloud with --token-file). The deadline
case calls a local socket that accepts connections and never answers, with a 0.5 s deadline: a
tiny deadline on a fast model is no reliable way to see DeadlineExceeded, as gRPC's timers are
coarser than a loopback round trip.
"""
import argparse
import socket
import sys

import numpy as np

from edge_runtime.client import sdk
from edgefold_proto.tensors import DTYPES


def attempt(what: str, call) -> None:
    try:
        call()
        print(f"{what}: ok")
    except sdk.InvalidInput as err:                           # a bug in the request: retrying will not help
        print(f"{what}: InvalidInput -> fix the request ({err.details()})")
    except sdk.NotFound as err:
        print(f"{what}: NotFound -> the model is not deployed there ({err.details()})")
    except (sdk.Unavailable, sdk.DeadlineExceeded) as err:    # down or late: answer on the device instead
        print(f"{what}: {type(err).__name__} -> use the on-device answer ({err.details()})")
    except sdk.Unauthenticated as err:
        print(f"{what}: Unauthenticated -> check the token ({err.details()})")
    except sdk.EdgefoldError as err:                          # anything else: report it
        print(f"{what}: {type(err).__name__} {err.code().name} ({err.details()})")


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--target", default="127.0.0.1:8011", help="the agent or the cloud, host:port")
parser.add_argument("--model", default="mlp")
parser.add_argument("--token-file", help="file holding the bearer token, for a server that wants one")
parser.add_argument("--unreachable", default="127.0.0.1:1", help="an address where nothing listens")
args = parser.parse_args()

with sdk.connect(args.target, token_file=args.token_file, timeout_s=5) as client:
    try:
        spec = client.metadata(args.model).inputs[0]
    except sdk.EdgefoldError as err:
        sys.exit(f"errors.py: cannot read the metadata of {args.model}: {type(err).__name__}: {err.details()}")
    x = np.ones([max(d, 1) for d in spec.shape], DTYPES[spec.datatype])
    extra_dim = np.ones(x.shape + (2,), x.dtype)
    attempt("right request", lambda: client.infer(args.model, {spec.name: x}))
    attempt("wrong input name", lambda: client.infer(args.model, {spec.name + "_typo": x}))
    attempt("wrong shape", lambda: client.infer(args.model, {spec.name: extra_dim}))
    attempt("not an array", lambda: client.infer(args.model, {spec.name: np.array([object()])}))
    attempt("unknown model", lambda: client.infer("no_such_model", {spec.name: x}))
with sdk.connect(args.target, token="wrong-token", timeout_s=5) as stranger:
    attempt("wrong token", lambda: stranger.infer(args.model, {spec.name: x}))
with sdk.connect(args.unreachable, timeout_s=5) as offline:
    attempt("unreachable server", lambda: offline.infer(args.model, {spec.name: x}))
hung = socket.create_server(("127.0.0.1", 0))          # accepts connections, never answers
with sdk.connect(f"127.0.0.1:{hung.getsockname()[1]}", timeout_s=0.5) as stuck:
    attempt("hung server", lambda: stuck.infer(args.model, {spec.name: x}))
hung.close()
