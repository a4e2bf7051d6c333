"""The edgefold version, read from the installed package's metadata (pyproject.toml's `version`),
so the agent, the cloud service and the package never disagree.

    from edgefold_proto.version import __version__
"""
import importlib.metadata

__version__ = importlib.metadata.version("edgefold")
