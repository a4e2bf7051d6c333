"""`edge-runtime agent --config agent.toml [--grace-s 10] [--log-level INFO]`: run the deploy agent
(see edge_runtime/agent/agent.py for what it does, edge_runtime/agent/config.py for the file)."""
import logging
import sys


def add_parser(commands) -> None:
    a = commands.add_parser("agent", help="the deploy agent: pull models, serve local apps, report to the cloud")
    a.add_argument("--config", required=True, help="agent.toml")
    a.add_argument("--grace-s", type=float, default=10.0, help="time in-flight requests get on SIGTERM")
    a.add_argument("--log-level", default="INFO")


def run(args) -> int:
    from edge_runtime.agent.agent import serve_until_signalled
    from edge_runtime.agent.config import load_agent_config
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_agent_config(args.config)
        return serve_until_signalled(config, args.grace_s)
    except (OSError, ValueError) as err:          # AgentConfigError, ProfileError, a port in use
        print(f"edge-runtime agent: {err}", file=sys.stderr)
        return 2
