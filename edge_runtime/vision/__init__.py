"""A split vision deployment on the device: the ONNX stage chain with its exits, offloading the rest
to the cloud, and the small/big model switch. ONNX Runtime and numpy; no torch.

    deployment.py      Deployment: the stage chain, exits and bottleneck encoders of deployment.json
    runtime.py         Runtime: one frame through a placement, with a deadline and a degraded local answer
    exit_policy.py     ExitPolicy: when an exit branch may answer (max softmax above its threshold)
    switch.py          AdaptiveSwitch: small model by default, the big one (or the cloud) when unsure
    placement_costs.py measure_candidates: each placement's costs on this machine, for split.planner
    placement_cli.py   `edge-runtime plan`: the planner's table and choice for a device and a link
"""
