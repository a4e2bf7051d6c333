"""The deploy agent: pulls its models from the cloud, runs them, reports heartbeats.

    agent.py             Agent: the supervisor loop (open, pull, heartbeat, adapt) and serve_until_signalled
    cli.py               `edge-runtime agent --config agent.toml`
    config.py            agent.toml, checked field by field
    model_store.py       the models on the device: pulled, sha256-verified, swapped in atomically
    policy.py            the offload policy: battery, heat and link quality -> where work goes
    oip_server.py        the local Open Inference Protocol endpoint apps call
    pipeline.py          what a pipeline is: Pipeline, TensorInfo, Context, PipelineInputError
    pipeline_factory.py  open_pipeline: the kind an agent.toml [[pipeline]] names -> its pipeline
    vision_pipelines.py  the kinds local, early-exit, split (ONNX Runtime)
    adaptive_pipeline.py the kind adaptive: small/big switching per client stream (ONNX Runtime)
    llm_pipelines.py     the kinds llm, collab-llm and tp, one token stream each (torch, imported when opened)
    http_api.py          the OpenAI-compatible HTTP endpoint ([serve] http_port; Starlette on uvicorn)
    http_stream.py       one generation over HTTP (detokenized, stop strings, SSE chunks) and its metrics
"""
