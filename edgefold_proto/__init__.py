"""The Open Inference Protocol messages, generated from proto/oip.proto, and the
method paths they are served under.

Our messages live in the proto package `edgefold.inference` (so this module and
tritonclient import into one process), but the wire contract is the KServe v2 /
Triton one: the same field numbers, served at `/inference.GRPCInferenceService/<Rpc>`.
"""
from dataclasses import dataclass

from edgefold_proto import oip_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
UNARY, SERVER_STREAMING, BIDI_STREAMING = "unary", "server-streaming", "bidi-streaming"


@dataclass(frozen=True)
class Method:
    """One RPC of a service we serve (the OIP one here, the fleet one in edgefold_proto.fleet)."""
    name: str
    request: type
    response: type
    kind: str = UNARY            # SERVER_STREAMING (DownloadModelFile) or BIDI_STREAMING (ModelStreamInfer)
    service: str = SERVICE

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


METHODS = {
    m.name: m
    for m in (
        Method("ServerLive", pb.ServerLiveRequest, pb.ServerLiveResponse),
        Method("ServerReady", pb.ServerReadyRequest, pb.ServerReadyResponse),
        Method("ModelReady", pb.ModelReadyRequest, pb.ModelReadyResponse),
        Method("ServerMetadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        Method("ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        Method("ModelInfer", pb.ModelInferRequest, pb.ModelInferResponse),
        Method("ModelStreamInfer", pb.ModelInferRequest, pb.ModelStreamInferResponse, BIDI_STREAMING),
        Method("ModelStatistics", pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
        Method("RepositoryIndex", pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
        Method("RepositoryModelLoad", pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
        Method("RepositoryModelUnload", pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse),
    )
}

__all__ = ["pb", "SERVICE", "METHODS", "Method", "UNARY", "SERVER_STREAMING", "BIDI_STREAMING"]
