"""`cloud-service keygen` and `cloud-service sign`: publisher keys and model signatures."""


def add_commands(commands) -> None:
    """Add this module's subcommands to the `cloud-service` parser."""
