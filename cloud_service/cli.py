"""`cloud-service`: the cloud inference service and the commands its operators run beside it.

    cloud-service serve --repository DIR --port 8001 [--metrics-port 8002] \
        [--token-file F] [--tls-cert C --tls-key K [--tls-client-ca CA [--client-cert-port P]]] \
        [--max-message-mb 64]
    cloud-service token add|list|revoke --repository DIR ...      (cloud_service/token_commands.py)
    cloud-service devices|rollout --repository DIR ...            (cloud_service/fleet_commands.py)
    cloud-service keygen|sign ...                                  (cloud_service/sign_commands.py)
"""
import argparse
import asyncio
import logging
import sys
from pathlib import Path

from cloud_service import fleet_commands, sign_commands, token_commands
from cloud_service.auth import read_token, tls_files
from cloud_service.config import ConfigError
from cloud_service.server import ServerOptions, serve_until_signalled


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloud-service", description="Open Inference Protocol gRPC service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model repository")
    serve.add_argument("--repository", type=Path, required=True, help="DIR/<model>/<version>/model.onnx")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8001, help="gRPC port (0: pick a free one)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    serve.add_argument("--token-file", type=Path, help="require 'authorization: Bearer <token>' on inference RPCs")
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS")
    serve.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    serve.add_argument("--tls-client-ca", type=Path,
                       help="PEM CA: clients present a certificate it signed; its subject CN is a device id and "
                            "acts as that device (a bearer token sent beside it wins). On --port unless "
                            "--client-cert-port is given")
    serve.add_argument("--client-cert-port", type=int, help="with --tls-client-ca: require certificates on this "
                       "port only, and keep --port for bearer tokens (gRPC cannot make a certificate optional)")
    serve.add_argument("--max-message-mb", type=float, default=64.0,
                       help="largest request or response (gRPC's default is 4); larger gets RESOURCE_EXHAUSTED")
    serve.add_argument("--grace-s", type=float, default=10.0, help="time in-flight requests get on shutdown")
    serve.add_argument("--log-level", default="INFO")
    for module in (token_commands, fleet_commands, sign_commands):
        module.add_commands(commands)       # each sets `run`: args -> exit status
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        try:
            return args.run(args)
        except (ConfigError, OSError, ValueError) as err:
            print(f"cloud-service {args.command}: {err}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if args.client_cert_port is not None and not args.tls_client_ca:
        parser.error("--client-cert-port goes with --tls-client-ca")
    try:
        cert, key, client_ca = tls_files(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert \
            else (None, None, None)
        options = ServerOptions(
            repository=args.repository, host=args.host, port=args.port, metrics_port=args.metrics_port,
            token=read_token(args.token_file, "--token-file") if args.token_file else None,
            tls_cert=cert, tls_key=key, tls_client_ca=client_ca, client_cert_port=args.client_cert_port,
            max_message_bytes=int(args.max_message_mb * (1 << 20)), grace_s=args.grace_s)
        asyncio.run(serve_until_signalled(options))
    except (ConfigError, OSError, ValueError) as err:
        print(f"cloud-service: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
