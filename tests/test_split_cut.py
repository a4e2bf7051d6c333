"""Cutting staged models into head and tail: exact composition, ONNX parity, clear errors."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from split.vision.cut import cut, stage_names
from split.vision.export import export_onnx
from split.vision.models import INPUT_SHAPES, build

MODELS = ["seq_cnn", "res_cnn", "vit"]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    torch.manual_seed(0)
    m = build(request.param).eval()
    return request.param, m, torch.rand(3, *INPUT_SHAPES[request.param])


def test_head_plus_tail_equals_whole_at_every_cut(model):
    name, m, x = model
    with torch.no_grad():
        whole = m(x)
        for k in range(1, len(m)):
            s = cut(m, k, x)
            assert s.index == k and s.name == stage_names(m)[k - 1]
            torch.testing.assert_close(s.tail(s.head(x)), whole, atol=1e-5, rtol=0)


def test_cut_by_name_and_shapes(model):
    name, m, x = model
    stage = stage_names(m)[1]
    s = cut(m, stage, x)
    assert s.index == 2 and s.activation_shape[0] == 3
    assert s.activation_bytes_fp32 == 4 * int(np.prod(s.activation_shape[1:]))


def test_onnx_head_equals_pytorch_head(model, tmp_path):
    name, m, x = model
    s = cut(m, 2, x)
    path = export_onnx(s.head, x, tmp_path / "head.onnx", "x", ["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):   # the batch dimension is dynamic
        got = session.run(None, {"x": x[:batch].numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, s.head(x[:batch]).numpy(), atol=1e-5, rtol=0)


def test_bad_cut_points_name_the_stages():
    m, x = build("res_cnn"), torch.rand(1, 1, 64, 64)
    with pytest.raises(ValueError, match="'nope' is not a stage; the model has stem, stage1"):
        cut(m, "nope", x)
    with pytest.raises(ValueError, match="leaves no tail"):
        cut(m, "classifier", x)
    with pytest.raises(ValueError, match="must be 1..5"):
        cut(m, 0, x)
    with pytest.raises(ValueError, match="shapes do not chain"):
        cut(m, "stage2", torch.rand(1, 3, 64, 64))
