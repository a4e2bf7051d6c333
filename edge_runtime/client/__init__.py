"""How the device and its apps talk to an Open Inference Protocol server (the cloud, or the deploy
agent on this device) and to the cloud's fleet service. grpc and numpy only; no torch, no onnxruntime.

    sdk.py           the app SDK: sdk.connect / sdk.connect_async -> a client with a deadline on every call
    errors.py        typed errors of an OIP call (Unavailable, DeadlineExceeded, InvalidInput, ...)
    oip_client.py    OipClient: the synchronous OIP client the runtime, the agent and the SDK share
    fleet_client.py  FleetClient: model manifests, resumable downloads, heartbeats (proto/fleet.proto)
"""
