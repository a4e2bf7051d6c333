"""Dynamic batching: 16 concurrent clients get merged batches, and each still gets exactly
its own rows back."""
import asyncio

import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as aioclient

from models import MLP_IN


def test_sixteen_concurrent_clients_form_batches(server, repository):
    session = ort.InferenceSession(str(repository / "mlp_batched" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    # Requests of 1 and 2 rows, so splitting the merged output back must respect row counts.
    xs = [rng.standard_normal((1 + i % 2, MLP_IN)).astype(np.float32) for i in range(16 * 4)]

    async def client_loop(client_id, clients):
        results = []
        for x in xs[client_id::16]:
            inp = aioclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            reply = await clients[client_id].infer("mlp_batched", [inp], client_timeout=60)
            results.append((x, reply.as_numpy("y")))
        return results

    async def main():
        clients = [aioclient.InferenceServerClient(server.address) for _ in range(16)]
        try:
            per_client = await asyncio.gather(*(client_loop(i, clients) for i in range(16)))
            stats = await clients[0].get_inference_statistics("mlp_batched")
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        return per_client, stats

    per_client, stats = asyncio.run(main())
    for results in per_client:
        for x, y in results:
            np.testing.assert_allclose(y, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    model_stats = stats.model_stats[0]
    batch_sizes = {b.batch_size: b.compute_infer.count for b in model_stats.batch_stats}
    assert max(batch_sizes) > 2, batch_sizes                      # merged beyond one request
    assert model_stats.inference_count == sum(len(x) for x in xs)
    assert model_stats.execution_count < len(xs)
    assert sum(size * count for size, count in batch_sizes.items()) == model_stats.inference_count
