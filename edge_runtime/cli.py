"""`edge-runtime`: the device side of edgefold.

    edge-runtime health --cloud 127.0.0.1:8001
    edge-runtime infer --cloud 127.0.0.1:8001 --model mlp --input x=frame.npy [--output y] [--json]
    edge-runtime tp prepare|worker|generate|keys ...   (tensor parallelism; see edge_runtime/tp/cli.py)
    edge-runtime plan --deployment DIR --device raspberry-pi-4 --link 10mbit,40ms
        (the split planner; see edge_runtime/vision/placement_cli.py)
    edge-runtime edvit-plan --package DIR --peers raspberry-pi-4,raspberry-pi-4,jetson-nano
        (an ED-ViT package over its peers; see edge_runtime/vision/edvit_plan_cli.py)
    edge-runtime generate|calibrate ...   (collaborative LLM; see edge_runtime/collab/cli.py)
    edge-runtime probe [--out F.toml] [--peer HOST:PORT] [--json]
        (measure this machine into a profile; see devices/probe_cli.py)
    edge-runtime agent --config agent.toml   (the deploy agent; see edge_runtime/agent/)
"""
import argparse
import json
import sys
from pathlib import Path

import grpc
import numpy as np

from edge_runtime.client.oip_client import OipClient


def _client(args) -> OipClient:
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    certs = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return OipClient(args.cloud, token=token, root_certificates=certs, timeout_s=args.timeout_s)


def _parse_inputs(items) -> dict[str, np.ndarray]:
    inputs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--input {item!r}: expected NAME=FILE.npy")
        inputs[name] = np.load(path, allow_pickle=False)
    return inputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="edge-runtime", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("health", "infer"):
        sub = commands.add_parser(name)
        sub.add_argument("--cloud", required=True, help="HOST:PORT of an Open Inference Protocol server")
        sub.add_argument("--token-file")
        sub.add_argument("--tls-ca", help="PEM root certificate: connect with TLS")
        sub.add_argument("--timeout-s", type=float, default=10.0)
        if name == "infer":
            sub.add_argument("--model", required=True)
            sub.add_argument("--version", default="")
            sub.add_argument("--input", action="append", default=[], help="NAME=FILE.npy (repeatable)")
            sub.add_argument("--output", action="append", default=[], help="only these outputs")
            sub.add_argument("--json", action="store_true", help="print outputs as JSON")
    from edge_runtime.tp import cli as tp_cli  # argparse only; torch is imported inside its handlers

    tp_cli.add_parser(commands)
    from edge_runtime.vision import placement_cli  # argparse here; onnxruntime only inside placement_cli.run
    placement_cli.add_parser(commands)
    from edge_runtime.vision import edvit_plan_cli  # argparse here; onnxruntime only inside its run
    edvit_plan_cli.add_parser(commands)
    from edge_runtime.collab import cli as collab_cli  # argparse here; torch only inside collab_cli.run
    collab_cli.add_parser(commands)
    from devices import probe_cli  # argparse here; numpy and psutil only inside probe_cli.run
    probe_cli.add_parser(commands)
    from edge_runtime.agent import cli as agent_cli  # argparse here; the agent is imported inside run
    agent_cli.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "agent":
        return agent_cli.run(args)
    if args.command in ("generate", "calibrate"):
        return collab_cli.run(args)
    if args.command == "plan":
        try:
            return placement_cli.run(args)
        except ValueError as err:        # ProfileError, a bad deployment, a bad link
            print(f"edge-runtime plan: {err}", file=sys.stderr)
            return 2
    if args.command == "edvit-plan":
        try:
            return edvit_plan_cli.run(args)
        except (OSError, ValueError) as err:    # ProfileError, a bad package, a bad link
            print(f"edge-runtime edvit-plan: {err}", file=sys.stderr)
            return 2
    if args.command == "probe":
        return probe_cli.run(args)
    if args.command == "tp":
        return tp_cli.main(args)
    try:
        with _client(args) as client:
            if args.command == "health":
                print(json.dumps({"live": client.live(), "ready": client.ready()}))
                return 0
            outputs = client.infer(args.model, _parse_inputs(args.input), args.version, args.output)
    except grpc.RpcError as err:
        print(f"edge-runtime: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"edge-runtime: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v.tolist() if v.dtype != object else [x.decode("utf-8", "replace") for x in v.ravel()]
                          for k, v in outputs.items()}))
    else:
        for name, value in outputs.items():
            print(f"{name} {value.dtype} {list(value.shape)}\n{value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
