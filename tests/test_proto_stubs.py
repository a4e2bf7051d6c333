"""The committed stubs match proto/*.proto, our OIP messages are wire-compatible with
tritonclient's (same field numbers and types), importable in one process, and the method
tables (METHODS, FLEET_METHODS) match the services the .proto files declare."""
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from edgefold_proto import BIDI_STREAMING, METHODS, SERVICE, pb
from edgefold_proto.fleet import FLEET_METHODS, FLEET_SERVICE, SERVER_STREAMING, fleet_pb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_committed_stubs_match_proto(tmp_path):
    import gen_proto
    generated = gen_proto.generate(tmp_path)
    assert generated, "protoc produced nothing"
    for path in generated:
        committed = ROOT / "edgefold_proto" / path.name
        assert committed.exists(), f"{path.name} is not committed: run `make proto`"
        assert committed.read_bytes() == path.read_bytes(), f"{path.name} drifted from proto/: run `make proto`"


def test_not_importable_as_top_level_proto():
    assert not (ROOT / "proto" / "__init__.py").exists()
    assert pb.DESCRIPTOR.package == "edgefold.inference"


def test_fleet_method_table_matches_proto():
    assert fleet_pb.DESCRIPTOR.package == "edgefold.fleet"
    service = fleet_pb.DESCRIPTOR.services_by_name["Fleet"]
    assert service.full_name == FLEET_SERVICE
    assert sorted(FLEET_METHODS) == sorted(m.name for m in service.methods)
    for name, method in FLEET_METHODS.items():
        declared = service.methods_by_name[name]
        assert method.request.DESCRIPTOR is declared.input_type and method.response.DESCRIPTOR is declared.output_type
        assert (method.kind == SERVER_STREAMING) == declared.server_streaming and not declared.client_streaming
        assert method.path == f"/edgefold.fleet.Fleet/{name}"


def _fields(descriptor):
    return {f.number: (f.name, f.type, f.is_repeated) for f in descriptor.fields}


def _compare(ours, theirs, path):
    """Every field we define exists in tritonclient's message with the same number and type."""
    their_fields = _fields(theirs)
    for number, (name, ftype, repeated) in _fields(ours).items():
        assert number in their_fields, f"{path}.{name} = {number} is not in tritonclient's message"
        assert their_fields[number] == (name, ftype, repeated), f"{path}.{name} differs from tritonclient"
        our_field = ours.fields_by_number[number]
        if our_field.type == FieldDescriptor.TYPE_MESSAGE:
            _compare(our_field.message_type, theirs.fields_by_number[number].message_type, f"{path}.{name}")


def test_wire_compatible_with_tritonclient():
    from tritonclient.grpc import service_pb2 as triton  # registers inference.* in the same process
    triton_service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for name, method in METHODS.items():
        theirs = triton_service.methods_by_name[name]
        _compare(method.request.DESCRIPTOR, theirs.input_type, method.request.DESCRIPTOR.name)
        _compare(method.response.DESCRIPTOR, theirs.output_type, method.response.DESCRIPTOR.name)
        assert (method.kind == BIDI_STREAMING) == theirs.server_streaming
        assert method.path == f"/inference.GRPCInferenceService/{name}"


def test_reflection_describes_the_wire_service(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    with grpc.insecure_channel(server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        assert SERVICE in services and "grpc.health.v1.Health" in services
        file_proto = db.FindFileContainingSymbol(SERVICE)
        assert isinstance(file_proto, descriptor_pb2.FileDescriptorProto)
        assert file_proto.package == "inference"
        rpcs = {m.name: m.input_type for m in file_proto.service[0].method}
        assert rpcs["ModelInfer"] == ".inference.ModelInferRequest"


@pytest.mark.parametrize("rpc", ["ServerLive", "ServerReady", "RepositoryIndex"])
def test_health_service_and_rpcs(server, rpc):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        method = METHODS[rpc]
        call = channel.unary_unary(method.path, request_serializer=method.request.SerializeToString,
                                   response_deserializer=method.response.FromString)
        call(method.request(), timeout=10)
