"""An MLServer runtime for one ONNX model, the serving peer in scripts/bench_cloud.py.

Runs only inside MLServer's own venv (mlserver and tritonclient cannot share a process):

    # DIR/<model>/model-settings.json
    {"name": "mlp", "implementation": "mlserver_onnx_runtime.OnnxRuntimeModel",
     "parameters": {"uri": "/abs/path/model.onnx"},
     "max_batch_size": 64, "max_batch_time": 0.0005}     # omit both: no adaptive batching
    PYTHONPATH=scripts ~/.cache/edgefold/mlserver-venv/bin/mlserver start DIR

Inputs and outputs go through MLServer's own NumpyCodec (raw_input_contents are unpacked by
MLServer before predict() sees them, and packed again on the way out). onnxruntime uses one
intra-op thread and runs on the event loop, as MLServer's own runtimes do with
`parallel_workers: 0`.
"""
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        path = await get_model_uri(self.settings, wellknown_filenames=["model.onnx"])
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for request_input in payload.inputs:
            if request_input.name not in self.input_names:
                raise ValueError(f"unexpected input '{request_input.name}'; the model takes {self.input_names}")
            feeds[request_input.name] = NumpyCodec.decode_input(request_input)
        values = self.session.run(self.output_names, feeds)
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(self.output_names, values)])
