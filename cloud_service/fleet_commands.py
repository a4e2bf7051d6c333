"""`cloud-service devices` and `cloud-service rollout`: the fleet registry's commands."""


def add_commands(commands) -> None:
    """Add this module's subcommands to the `cloud-service` parser."""
