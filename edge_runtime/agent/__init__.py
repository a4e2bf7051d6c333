"""The deploy agent: pulls its models from the cloud, runs them, reports heartbeats."""
