"""torch.onnx.export of gated models (both exporters), run with ONNX Runtime."""

import copy

import pytest
import torch
from torch import nn

import csext
from numerics import mask_logits_like

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _gated_model():
    """Soft, hard and rescaled gates, lam above zero, a reflect-padded and a grouped convolution,
    and a linear layer on batched (N, T, K) input."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False), nn.ReLU(),
        nn.Flatten(2), nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, 5),
    )
    csext.sparsify(model, penalty=1e-3)
    for _, m in csext.gated_modules(model):
        with torch.no_grad():
            m.mask_logits.copy_(mask_logits_like(m.weight))
    csext.set_beta(model, 3.7)
    model[2].hard = True
    model[5].mask_scale = 1.5
    return model.eval()


def _export(model, x, path, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")
        batch = torch.export.Dim("batch", min=2)
        program = torch.onnx.export(model, (x,), dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
        program.save(str(path))
    else:
        torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning",
                            "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("backend", ["auto", "torch", "cpp", "triton"])
def test_onnx_export_of_a_gated_model_computes_its_outputs(tmp_path, dynamo, backend):
    if backend not in csext.backends.available() + ["auto"]:
        pytest.skip(f"backend {backend!r} is not available here")
    model = _gated_model()
    for _, m in csext.gated_modules(model):
        m.backend = backend
    before = copy.deepcopy(model.state_dict())
    path = tmp_path / "gated.onnx"
    _export(model, torch.randn(3, 3, 7, 7), path, dynamo)
    for key, value in model.state_dict().items():  # the export changed nothing
        assert torch.equal(value, before[key]), key

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    x = torch.randn(4, 3, 7, 7)  # another batch size than the export's
    (y,) = session.run(None, {name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-5, atol=1e-5)

    import onnx

    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert not any("csext" in d for d in domains), domains


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning",
                            "ignore::torch.jit.TracerWarning")
def test_onnx_export_keeps_beta_as_it_was_and_the_layers_train_afterwards(tmp_path):
    model = _gated_model()
    x = torch.randn(2, 3, 7, 7)
    _export(model, x, tmp_path / "a.onnx", dynamo=False)
    csext.set_beta(model, 50.0)
    _export(model, x, tmp_path / "b.onnx", dynamo=False)
    outputs = []
    for name in ("a.onnx", "b.onnx"):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(outputs[1]), model(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1]))

    # After the export, the fused backend and its lam are back: the gradients are the reference's
    reference = copy.deepcopy(model)
    for _, m in csext.gated_modules(reference):
        m.backend = "torch"
    for net in (model, reference):
        net.train()
        net(x).square().sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning",
                            "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_of_a_gated_transformer_computes_its_outputs(tmp_path, dynamo):
    """A transformer encoder layer with its attention (GatedMultiheadAttention) and feed-forward
    layers gated, then a GatedHFConv1D (GPT-2's layer), soft masks, exported at one input shape."""
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 1,
                                    enable_nested_tensor=False)
    model = nn.Sequential(encoder, csext.GatedHFConv1D(8, 16))
    csext.sparsify(model, penalty=1e-3)
    for _, m in csext.gated_modules(model):
        with torch.no_grad():
            m.mask_logits.copy_(mask_logits_like(m.weight))
    csext.set_beta(model, 2.5)
    model.eval()
    x = torch.randn(2, 5, 16)
    path = tmp_path / "transformer.onnx"
    if dynamo:
        torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(str(path))
    else:
        torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    (y,) = session.run(None, {name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-5, atol=1e-5)
