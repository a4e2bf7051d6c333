"""The collaborative LLM's device side (DESIGN.md, "Continue in the cloud").

    device.py        CollabLlm: edge layers + exit head; confident tokens here, the rest from the cloud
    stream.py        CloudStream: --mode cloud-stream, the cloud generates the whole answer and streams it
    speculative.py   --mode speculative: drafters, adaptive gamma, one verification call per draft
    conversation.py  per-conversation state (what the cloud acknowledged), per-request results
    cli.py           `edge-runtime generate` and `edge-runtime calibrate` (torch only inside run())
"""
