"""Triton's decoupled transaction policy on ModelStreamInfer: one request to a decoupled model
(config.toml `[model_transaction_policy] decoupled = true`, e.g. backend llm_stream) gets a response
per item the model produces, each with the parameter `triton_final_response` (true on its last one;
with `triton_enable_empty_final_response` the last is an empty response of its own, as Triton
sends). Errors travel in-band, naming the request they answer.
"""
import time

from cloud_service.request import model_inputs
from edgefold_proto import pb
from edgefold_proto.serving import encode_response, parameters, requested_outputs, stream_error


async def stream_decoupled(request: pb.ModelInferRequest, model, metric, send) -> None:
    """Answer one request to a decoupled model with a response per item it produces."""
    start = time.perf_counter_ns()
    try:
        names = requested_outputs(request, [spec.name for spec in model.config.outputs])
        inputs = model_inputs(request, model.config)
        params = parameters(request.parameters)
        empty_final = params.pop("triton_enable_empty_final_response", False) is True
        last_params: dict = {}
        async for outputs, out_params, last in model.stream(inputs, params):
            response = encode_response(request, model.version, outputs, names)
            _set_parameters(response, out_params, triton_final_response=last and not empty_final)
            send(pb.ModelStreamInferResponse(infer_response=response))
            last_params = out_params
        if empty_final:
            response = pb.ModelInferResponse(model_name=request.model_name, model_version=model.version,
                                             id=request.id)
            _set_parameters(response, last_params, triton_final_response=True)
            send(pb.ModelStreamInferResponse(infer_response=response))
    except Exception as err:
        model.stats.request_done(False, time.perf_counter_ns() - start)
        metric.failure.inc()
        reply = stream_error(err)
        reply.infer_response.model_name, reply.infer_response.id = request.model_name, request.id  # whose error
        send(reply)
        return
    model.stats.request_done(True, time.perf_counter_ns() - start)
    metric.success.inc()


def _set_parameters(response: pb.ModelInferResponse, values: dict, **more) -> None:
    for key, value in {**values, **more}.items():
        param = response.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)
