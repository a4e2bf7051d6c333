"""edge_runtime: what runs on the device.

    cli.py      the `edge-runtime` command; each subcommand's parser lives with what it runs
    client/     the app SDK and the clients the device uses to talk to the cloud (OIP, fleet)
    vision/     a split vision deployment: stages and exits, offload, switching, `edge-runtime plan`
    agent/      the deploy agent (`edge-runtime agent`): pulls its models, serves them, heartbeats
    tp/         tensor-parallel LLM inference across peer devices (`edge-runtime tp`)
    collab/     the collaborative LLM's device side (`edge-runtime generate|calibrate`)
    llm_api/    the OpenAI API's text layer: chat templates, incremental detokenizing, requests (issue 13)

`edge-runtime probe` is devices/probe_cli.py, beside the probe it runs.
"""
