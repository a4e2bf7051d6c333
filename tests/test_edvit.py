"""ED-ViT's model side (issue 16, item 1): class partition by capability, class-wise pruning that
computes exactly the full block with the dropped heads and channels silenced, sub-models at most a
third of the full ViT's MACs at three peers, importance that ignores what cannot change the loss,
and a fusion whose ONNX export (with a missing peer) equals PyTorch. Random-initialised ViT, a few
images: the accuracy figures belong to scripts/bench_edvit.py, not here."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from split.vision.edvit import (Fusion, class_wise_submodel, distill, fold, fusion_inputs, importance,
                                partition_classes, prune_block, train_fusion)
from split.vision.export import export_onnx
from split.vision.flops import macs
from split.vision.models import Block, vit


@pytest.mark.parametrize("capabilities", [[1, 1, 1], [1.0, 1.0, 0.5], [4, 1], [1] * 10, [3, 1, 1, 1, 1]])
def test_partition_covers_every_class_once_more_to_the_capable(capabilities):
    parts = partition_classes(10, capabilities)
    assert sorted(c for p in parts for c in p) == list(range(10))
    assert all(parts) and len(parts) == len(capabilities)
    sizes = [len(p) for p in parts]
    for i, j in zip(range(len(sizes)), range(1, len(sizes))):
        if capabilities[i] > capabilities[j]:
            assert sizes[i] >= sizes[j]


def test_partition_refuses_what_cannot_be_split():
    for bad in ([], [1] * 11, [1, 0], [1, -2]):
        with pytest.raises(ValueError):
            partition_classes(10, bad)


def test_pruned_block_is_the_full_block_with_the_rest_silenced():
    torch.manual_seed(0)
    block, x = Block(64, 4), torch.randn(2, 65, 64)
    keep_h, keep_c = [1, 3], [0, 5, 9, 100, 127]
    silenced = Block(64, 4)
    silenced.load_state_dict(block.state_dict())
    with torch.no_grad():
        cols = torch.ones(4, 16)
        cols[[h for h in range(4) if h not in keep_h]] = 0
        silenced.proj.weight.mul_(cols.reshape(1, 64))                 # dropped heads reach nothing
        chans = torch.zeros(128)
        chans[keep_c] = 1
        silenced.mlp[2].weight.mul_(chans)                              # dropped channels reach nothing
        torch.testing.assert_close(prune_block(block, keep_h, keep_c)(x), silenced(x), rtol=1e-5, atol=1e-5)


def test_importance_is_zero_for_a_head_that_cannot_change_the_loss():
    torch.manual_seed(0)
    full = vit()
    with torch.no_grad():
        full.block2.proj.weight[:, 16:32] = 0                           # head 1 of block 2 is cut off
    x, y = torch.rand(12, 1, 64, 64).numpy(), np.arange(12) % 10
    scores = importance(full, [0, 1, 2], x, y)
    assert len(scores) == 4 and scores[1][0][1] == 0 and (scores[1][0][[0, 2, 3]] > 0).all()
    assert all((s[1] >= 0).all() and s[1].shape == (128,) for s in scores)


def test_three_submodels_are_each_at_most_a_third_of_the_full_vit():
    torch.manual_seed(0)
    full, example = vit().eval(), torch.rand(1, 1, 64, 64)
    x, y = torch.rand(20, 1, 64, 64).numpy(), np.arange(20) % 10
    parts = partition_classes(10, [1, 1, 1])
    for classes in parts:
        sub = class_wise_submodel(full, classes, importance(full, classes, x, y), heads=1, hidden=32)
        assert sub(example).shape == (1, len(classes) + 1)
        assert macs(sub, example) <= macs(full, example) / 3
    # the full head's rows for its classes carry over: before distillation its class logits match
    sub = class_wise_submodel(full, parts[0], importance(full, parts[0], x, y), heads=4, hidden=128)
    torch.testing.assert_close(sub(example)[:, :len(parts[0])], full(example)[:, parts[0]], rtol=1e-5, atol=1e-5)


def test_fold_keeps_probability_mass():
    probs = torch.softmax(torch.randn(5, 10), 1)
    folded = fold(probs, [2, 7])
    torch.testing.assert_close(folded.sum(1), torch.ones(5))
    torch.testing.assert_close(folded[:, :2], probs[:, [2, 7]])


def test_fusion_onnx_equals_pytorch_with_a_missing_peer(tmp_path):
    torch.manual_seed(0)
    parts = partition_classes(10, [1, 1, 1])
    fusion = Fusion(parts).eval()
    outputs = [torch.randn(4, len(p) + 1) for p in parts]
    outputs[1] = None                                                     # peer 1 did not answer
    answers, present = fusion_inputs(outputs, parts)
    assert present.tolist() == [[1.0, 0.0, 1.0]] * 4 and (answers[:, 5:9] == 0).all()
    path = export_onnx(fusion, (answers, present), tmp_path / "fusion.onnx", ["answers", "present"], ["logits"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"answers": answers.numpy(), "present": present.numpy()})[0]
    np.testing.assert_allclose(got, fusion(answers, present).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_distil_and_fusion_train_end_to_end_on_a_few_images(tmp_path):
    torch.manual_seed(0)
    full = vit().eval()
    x, y = torch.rand(40, 1, 64, 64).numpy(), np.arange(40) % 10
    parts = partition_classes(10, [1, 1])
    subs = [distill(class_wise_submodel(full, p, importance(full, p, x, y), heads=1, hidden=32), full, p, x, y,
                    epochs=1) for p in parts]
    fusion = train_fusion(subs, parts, x, y, epochs=2)
    with torch.no_grad():
        logits = fusion(*fusion_inputs([s(torch.from_numpy(x)) for s in subs], parts))
    assert logits.shape == (40, 10) and torch.isfinite(logits).all()
    path = export_onnx(subs[0], torch.from_numpy(x[:1]), tmp_path / "sub0.onnx", ["image"], ["logits"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x[:3]})[0]
    np.testing.assert_allclose(got, subs[0](torch.from_numpy(x[:3])).detach().numpy(), rtol=1e-4, atol=1e-4)
