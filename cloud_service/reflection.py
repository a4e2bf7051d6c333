"""Server reflection that describes the service under its wire name.

Our messages are registered as `edgefold.inference.*` (see proto/oip.proto), but clients
such as grpcurl must see `inference.GRPCInferenceService`. We build a private descriptor
pool holding a copy of oip.proto renamed to the package `inference` and serve reflection
from it; the process-wide pool (shared with tritonclient) is not touched.
"""
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from edgefold_proto import SERVICE, pb

_OURS, _WIRE = "edgefold.inference", "inference"


def _rename_types(messages) -> None:
    for message in messages:
        for field in message.field:
            if field.type_name.startswith(f".{_OURS}."):
                field.type_name = f".{_WIRE}." + field.type_name[len(_OURS) + 2:]
        _rename_types(message.nested_type)


def _renamed_oip() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = "grpc_service.proto", _WIRE
    _rename_types(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{_OURS}.", f".{_WIRE}.", 1)
            method.output_type = method.output_type.replace(f".{_OURS}.", f".{_WIRE}.", 1)
    return proto


def _copy(file_descriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    return proto


def wire_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_renamed_oip())
    pool.Add(_copy(health_pb2.DESCRIPTOR))
    pool.Add(_copy(reflection_pb2.DESCRIPTOR))
    return pool


def enable(server) -> None:
    names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=wire_pool())
