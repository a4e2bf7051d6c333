"""The agent's pipeline factory: one pipeline per `[[pipeline]]` of agent.toml, each over a model
folder on the device (pulled from the cloud, or a local path).

    pipe = open_pipeline(spec, folder, context)       # folder: <model>/<version>/ on the device
    pipe.infer({"x": frame}, {})["label"]

Kinds:
- local       an ONNX model run by ONNX Runtime on the device
- early-exit  a split deployment's stage chain with its exits, every frame on the device
- split       the same, offloading the rest through the cloud (placement string or "auto": the
              planner, re-run when the policy changes objective or the link's RTT changes)
- edvit       ED-ViT: the frame to every peer's agent (one class-wise sub-model each), fused here
- adaptive    a small and a big model switched per frame (temporal consistency, the small model's
              predicted error, or both; per client stream), escalating to the cloud's copy of the
              big model when the link is good
- llm         a Llama-family checkpoint on this device alone (the tp engine at world size 1: paging,
              int8 / int4 weights)
- collab-llm  the collaborative LLM (edge layers + exit head; the cloud finishes the rest)
- tp          rank 0 of a tensor-parallel group (workers started here, or an elastic group over peers)
The kinds live in vision_pipelines.py (local, early-exit, split, edvit), adaptive_pipeline.py and llm_pipelines.py
(llm, collab-llm, tp; each also streams tokens: LlmPipeline.stream); torch is imported only when
one of the LLM kinds is opened.
"""
from pathlib import Path

from edge_runtime.agent import adaptive_pipeline, llm_pipelines, vision_pipelines
from edge_runtime.agent.pipeline import Context, Pipeline


def open_pipeline(spec, folder: Path, ctx: Context) -> Pipeline:
    """Build the pipeline of an agent.toml [[pipeline]] over a model folder (`<model>/<version>/`)."""
    if spec.kind == "local":
        return vision_pipelines.OnnxPipeline(spec.name, folder, spec.options, ctx)
    if spec.kind in ("early-exit", "split"):
        return vision_pipelines.VisionPipeline(spec.name, spec.kind, folder, spec.options, ctx)
    if spec.kind == "edvit":
        return vision_pipelines.EdvitPipeline(spec.name, folder, spec.options, ctx)
    if spec.kind == "adaptive":
        return adaptive_pipeline.AdaptivePipeline(spec.name, folder, spec.options, ctx)
    if spec.kind == "llm":
        return llm_pipelines.LocalLlmPipeline(spec.name, folder, spec.options, ctx)
    if spec.kind == "collab-llm":
        return llm_pipelines.CollabPipeline(spec.name, folder, spec.options, ctx)
    if spec.kind == "tp":
        return llm_pipelines.TensorParallelPipeline(spec.name, folder, spec.options, ctx)
    raise ValueError(f"pipeline '{spec.name}': unknown kind '{spec.kind}'")
