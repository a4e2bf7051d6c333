"""Vision models for split computing: staged CNNs and a small ViT, data, cutting, exits, bottlenecks.

Modules that need torch import it themselves; `split.codec`, `split.png` and `split.planner`
stay numpy/stdlib-only so the device and the cloud can use them without torch.
"""
