"""What operators rely on: Prometheus metrics, clean shutdown that finishes in-flight
requests, config errors that name the file and field, the edge importing without torch."""
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from cloud_service.config import ConfigError, load_config
from edge_runtime.client.oip_client import OipClient
from models import MLP_IN, write
from server_process import ServerProcess, free_port


def test_metrics_endpoint(repository):
    port = free_port()
    proc = ServerProcess(repository, "--metrics-port", str(port))
    try:
        with OipClient(proc.address) as client:
            for _ in range(3):
                client.infer("mlp", {"x": np.ones((2, MLP_IN), np.float32)})
            client.infer("counter", {"x": np.ones(4)}, parameters={"sequence_id": 1, "sequence_start": True})
            with pytest.raises(Exception):
                client.infer("mlp", {"x": np.ones((2, 3), np.float32)})
        deadline = time.monotonic() + 10
        while True:  # the session gauge is refreshed once a second
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if 'edgefold_sessions{model="counter",version="1"} 1.0' in text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert 'edgefold_inference_requests_total{model="mlp",status="success",version="1"} 3.0' in text
        assert 'edgefold_inference_requests_total{model="mlp",status="failure",version="1"} 1.0' in text
        assert 'edgefold_batch_size_bucket{le="2.0",model="mlp",version="1"} 3.0' in text
        assert 'edgefold_request_bytes_total{model="mlp",version="1"} 384.0' in text   # 3 x 2 x 16 x 4 B
        assert 'edgefold_response_bytes_total{model="mlp",version="1"} 96.0' in text
        assert "edgefold_compute_duration_seconds_count" in text and "edgefold_queue_duration_seconds" in text
        assert 'edgefold_sessions{model="counter",version="1"} 1.0' in text
    finally:
        proc.kill()


def test_sigterm_finishes_in_flight_request(repository):
    proc = ServerProcess(repository)
    result = {}

    def slow_call():
        with OipClient(proc.address, timeout_s=30) as client:
            result["y"] = client.infer("slow", {"x": np.array([1.5], np.float32)})["y"]

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.5)                      # the request is now inside the model (it sleeps 1.5 s)
    code = proc.terminate()
    caller.join(30)
    assert code == 0, proc.output()
    assert result["y"].tolist() == [1.5]
    assert "cloud-service stopped" in proc.output()


def test_bad_model_does_not_stop_the_others(tmp_path):
    from models import mlp_onnx
    mlp_onnx(tmp_path / "good" / "1" / "model.onnx")
    write(tmp_path / "broken" / "1" / "model.onnx", "this is not onnx")
    write(tmp_path / "badconfig" / "config.toml", "max_batch_size = -3\n")
    mlp_onnx(tmp_path / "badconfig" / "1" / "model.onnx")
    proc = ServerProcess(tmp_path)
    try:
        with OipClient(proc.address) as client:
            assert client.infer("good", {"x": np.ones((1, MLP_IN), np.float32)})["y"].shape == (1, 4)
            from edgefold_proto import pb
            index = {m.name: m for m in client.call("RepositoryIndex", pb.RepositoryIndexRequest()).models}
            assert index["broken"].state == "UNAVAILABLE" and "onnxruntime cannot load" in index["broken"].reason
            assert "max_batch_size" in index["badconfig"].reason and "config.toml" in index["badconfig"].reason
    finally:
        proc.kill()


@pytest.mark.parametrize("text,fragment", [
    ("max_batch_size = 'x'", "'max_batch_size' must be an integer"),
    ("[[input]]\nname='x'\ndata_type='TYPE_FP33'\ndims=[1]", "data_type 'TYPE_FP33'"),
    ("[[input]]\nname='x'\ndata_type='TYPE_FP32'\ndims=[0]", "'dims' must be a list of positive ints"),
    ("[[input]]\ndata_type='TYPE_FP32'\ndims=[1]", "input[0]: missing 'name'"),
    ("backend = 'tensorflow'", "backend 'tensorflow'"),
    ("max_batch_size = 4\n[dynamic_batching]\n[sequence_batching]", "not both"),
    ("not toml [", "not valid TOML"),
])
def test_config_errors_name_file_and_field(tmp_path, text, fragment):
    write(tmp_path / "m" / "config.toml", text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "m")
    assert fragment in str(err.value) and str(tmp_path / "m" / "config.toml") in str(err.value)


def test_edge_client_imports_without_torch():
    code = ("import sys, edge_runtime.cli, edge_runtime.client.oip_client, edgefold_proto.tensors; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_errors_are_clear(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "cloud_service.cli", "serve", "--repository", str(tmp_path / "no")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "not a directory" in missing.stderr
    down = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "health", "--cloud", f"127.0.0.1:{free_port()}",
                           "--timeout-s", "1"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
