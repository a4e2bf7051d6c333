"""`cloud-service token add|list|revoke`: the credential store's commands."""


def add_commands(commands) -> None:
    """Add this module's subcommands to the `cloud-service` parser."""
