"""The eager fast path of the gated layers (csext._C.gated_linear / gated_conv2d, csrc/python.cpp):
it takes what the checked Python path takes, or less, gives that path's results, and hands
everything else back (None) so that the Python path raises its errors."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode

import csext
from csext import functional as CF
from numerics import FUSED_BACKENDS, mask_logits_like

pytestmark = pytest.mark.skipif(not FUSED_BACKENDS, reason="the C++ extension is not built")

EAGER = CF._EAGER


def linear_args(bias=True, dtype=torch.float32):
    w = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    s = mask_logits_like(w, torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    b = torch.randn(5, dtype=dtype, requires_grad=True) if bias else None
    x = torch.randn(2, 3, 7, dtype=dtype, requires_grad=True)
    return [x, w, s, 3.0, b, False, 1e-3]


def conv_args(bias=True, groups=1):
    w = torch.randn(4, 6 // groups, 3, 2, requires_grad=True)
    s = mask_logits_like(w).requires_grad_()
    b = torch.randn(4, requires_grad=True) if bias else None
    x = torch.randn(2, 6, 9, 8, requires_grad=True)
    return [x, w, s, 3.0, b, False, 1e-3, (2, 1), [1, 0], 1, groups]


def checked_path(monkeypatch, kind, args):
    """The same call with the fast path switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(CF, "_EAGER", None)
        return call(kind, args)


def call(kind, args):
    if kind == "linear":
        x, w, s, beta, b, hard, penalty = args
        return CF.gated_linear(x, w, s, beta, b, hard=hard, penalty=penalty)
    x, w, s, beta, b, hard, penalty, stride, padding, dilation, groups = args
    return CF.gated_conv2d(x, w, s, beta, b, stride, padding, dilation, groups, hard=hard, penalty=penalty)


def gradients(y, args):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return torch.autograd.grad(y.float().square().sum(), leaves, allow_unused=True)  # hard: s gets none


@pytest.mark.parametrize("kind,variant", [
    ("linear", "bias"), ("linear", "no bias"), ("linear", "hard"), ("linear", "float64"),
    ("linear", "autocast"), ("conv", "bias"), ("conv", "no bias"), ("conv", "groups"), ("conv", "hard"),
    ("conv", "autocast"), ("conv", "channels_last"),
])
def test_fast_path_is_taken_and_matches_the_checked_path(monkeypatch, kind, variant):
    make = linear_args if kind == "linear" else conv_args
    args = make(bias=variant != "no bias", **({"dtype": torch.float64} if variant == "float64" else {}),
                **({"groups": 2} if variant == "groups" else {}))
    if variant == "hard":
        args[5] = True
    if variant == "channels_last":
        args[0] = args[0].detach().to(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "autocast"):
        taken = getattr(EAGER, "gated_" + ("linear" if kind == "linear" else "conv2d"))(*args)
        assert taken is not None, "the fast path handed a valid call back"
        fast = call(kind, args)
        checked = checked_path(monkeypatch, kind, args)
    assert fast.dtype == checked.dtype == (torch.bfloat16 if variant == "autocast" else args[1].dtype)
    assert fast.grad_fn.name() == checked.grad_fn.name()  # the one layer-op node, on both paths
    torch.testing.assert_close(fast, checked, rtol=0, atol=0)
    for a, b in zip(gradients(fast, args), gradients(checked, args)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class Subclass(torch.Tensor):
    pass


def _rejected_linear():
    cases = {}
    def case(name, index, value):
        cases[name] = (index, value)
    case("x a subclass", 0, lambda a: a[0].detach().as_subclass(Subclass))
    case("x wrong width", 0, lambda a: torch.randn(2, 6))
    case("x 0-dim", 0, lambda a: torch.randn(()))
    case("x another dtype", 0, lambda a: a[0].detach().double())
    case("x on meta", 0, lambda a: a[0].detach().to("meta"))
    case("x not a tensor", 0, lambda a: [[1.0] * 7])
    case("weight 3-D", 1, lambda a: a[1].detach().view(5, 7, 1))
    case("weight int", 1, lambda a: a[1].detach().int())
    case("mask_logits shape", 2, lambda a: a[2].detach()[:4])
    case("mask_logits float64", 2, lambda a: a[2].detach().double())
    case("mask_logits bf16", 2, lambda a: a[2].detach().bfloat16())
    case("beta below 1", 3, lambda a: 0.5)
    case("beta nan", 3, lambda a: float("nan"))
    case("beta inf", 3, lambda a: float("inf"))
    case("beta bool", 3, lambda a: True)
    case("beta a tensor", 3, lambda a: torch.tensor(2.0))
    case("bias another dtype", 4, lambda a: a[4].detach().half())
    case("bias on meta", 4, lambda a: a[4].detach().to("meta"))
    case("hard not a bool", 5, lambda a: 1)
    case("penalty negative", 6, lambda a: -1.0)
    case("penalty nan", 6, lambda a: float("nan"))
    case("penalty a string", 6, lambda a: "0")
    return cases


@pytest.mark.parametrize("name", sorted(_rejected_linear()))
def test_fast_path_hands_back_what_it_does_not_take(name):
    index, make = _rejected_linear()[name]
    args = linear_args()
    args[index] = make(args)
    assert EAGER.gated_linear(*args) is None


@pytest.mark.parametrize("index,value", [
    (0, torch.randn(6, 9, 8)),  # unbatched: the Python path runs F.conv2d
    (0, torch.randn(2, 5, 9, 8)),  # channels do not match
    (7, (1, 1, 1)), (7, 1.5), (8, "same"), (8, "valid"), (9, (True, 1)), (10, 0), (10, 2),
])
def test_fast_conv_hands_back_what_it_does_not_take(index, value):
    args = conv_args()
    args[index] = value
    assert EAGER.gated_conv2d(*args) is None


def test_fast_path_leaves_torch_function_modes_to_python():
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    args = linear_args()
    with Record():
        assert EAGER.gated_linear(*args) is None
        call("linear", args)
    assert seen, "the mode saw nothing of the call"


def test_fast_path_argument_count_is_checked():
    with pytest.raises(TypeError, match="takes 7 arguments, got 2"):
        EAGER.gated_linear(torch.randn(2), torch.randn(2))


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in csext.backends.available(), reason="the CUDA kernels of csext._C are not built")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fast_path_on_cuda_under_autocast(monkeypatch, kind):
    args = [a.detach().cuda().requires_grad_() if isinstance(a, torch.Tensor) else a
            for a in (linear_args() if kind == "linear" else conv_args())]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert getattr(EAGER, "gated_" + ("linear" if kind == "linear" else "conv2d"))(*args) is not None
        fast = call(kind, args)
        checked = checked_path(monkeypatch, kind, args)
    assert fast.dtype == checked.dtype == torch.bfloat16
    torch.testing.assert_close(fast, checked, rtol=0, atol=0)
    for a, b in zip(gradients(fast, args), gradients(checked, args)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # cuDNN's weight gradient may use atomics


def test_fast_path_under_checkpoint_and_saved_tensor_hooks():
    """The op runs without the GIL; Python pack hooks (checkpointing, save_on_cpu) still run."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(csext.GatedConv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                csext.GatedLinear(4 * 6 * 6, 5))
    csext.set_beta(model, 3.0)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)

    def grads(forward):
        model.zero_grad(set_to_none=True)
        x.grad = None
        forward().square().sum().backward()
        return [p.grad for p in model.parameters()] + [x.grad]

    plain = grads(lambda: model(x))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        hooked = grads(lambda: model(x))
    assert packed, "no saved tensor went through the pack hook"
    checkpointed = grads(lambda: checkpoint(model, x, use_reentrant=False))
    for others in (hooked, checkpointed):
        for a, b in zip(plain, others):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- autocast's cast of x, with csext's node (csrc/input_cast.cpp) ----------------------------------


def input_node(y):
    """The node behind the layer's input: its first edge."""
    return y.grad_fn.next_functions[0][0]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autocast_cast_of_x_is_csext_node(monkeypatch, kind):
    """Under autocast the fast path casts a float32 x with csext's node, whose backward gives
    ATen's cast's dL/dx bit for bit (test_fast_path_is_taken_and_matches_the_checked_path
    compares every gradient); an x that takes no gradient gets no node."""
    args = (linear_args if kind == "linear" else conv_args)()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = call(kind, args)
        checked = checked_path(monkeypatch, kind, args)
        frozen = call(kind, [args[0].detach()] + args[1:])
    assert input_node(fast).name() == "csext::InputCastBackward"
    assert input_node(checked).name() == "ToCopyBackward0"
    assert input_node(frozen) is None
    (grad_fast,) = torch.autograd.grad(fast.float().sum(), args[0])
    (grad_checked,) = torch.autograd.grad(checked.float().sum(), args[0])
    assert grad_fast.dtype == torch.float32 and grad_fast.stride() == grad_checked.stride()
    torch.testing.assert_close(grad_fast, grad_checked, rtol=0, atol=0)


def test_autocast_cast_node_under_autograd_machinery(monkeypatch):
    """The cast node with create_graph (a loss on dL/dx reaches w), retain_graph, compiled
    autograd, torch.func.grad and forward-mode AD (both of which take ATen's cast), against the
    path that casts with x.to."""
    args = linear_args()
    x, w = args[0], args[1]

    def layer(fast, x=x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (call if fast else lambda kind, a: checked_path(monkeypatch, kind, a))("linear", [x] + args[1:])

    def loss(y):
        return y.float().square().sum()

    for fast in (True, False):
        (gx,) = torch.autograd.grad(loss(layer(fast)), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.square().sum(), w)
        if fast:
            want_gw = gw
        else:
            torch.testing.assert_close(gw, want_gw, rtol=0, atol=0)

    y = layer(True)
    first = torch.autograd.grad(loss(y), x, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(loss(y), x)[0], first, rtol=0, atol=0)

    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        x.grad = None
        loss(layer(True)).backward()
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)
    x.grad = None

    grad_x = torch.func.grad(lambda x: loss(layer(True, x)))(x.detach())
    torch.testing.assert_close(grad_x, first, rtol=0, atol=0)

    tangent = torch.randn_like(x)
    _, jvp_fast = torch.func.jvp(lambda x: layer(True, x), (x.detach(),), (tangent,))
    _, jvp_checked = torch.func.jvp(lambda x: layer(False, x), (x.detach(),), (tangent,))
    torch.testing.assert_close(jvp_fast, jvp_checked, rtol=0, atol=0)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)  # x still takes a gradient: the tangent decides
        tangents = [fwAD.unpack_dual(layer(fast, dual)).tangent for fast in (True, False)]
    torch.testing.assert_close(tangents[0], tangents[1], rtol=0, atol=0)
    torch.testing.assert_close(tangents[0], jvp_checked, rtol=0, atol=0)


def test_autocast_input_hands_subclasses_and_modes_to_x_to():
    """csext._C.autocast_input: a tensor subclass or a __torch_function__ mode gets x.to(dtype),
    which they see; a plain tensor that takes a gradient gets csext's node."""
    seen = []

    class Recording(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, 4, requires_grad=True)
    assert EAGER.autocast_input(x, torch.bfloat16).grad_fn.name() == "csext::InputCastBackward"
    with Recording():
        y = EAGER.autocast_input(x, torch.bfloat16)
    assert "to" in seen and y.grad_fn.name() == "ToCopyBackward0"
    sub = torch.Tensor._make_subclass(type("Sub", (torch.Tensor,), {}), x.detach(), True)
    cast_sub = EAGER.autocast_input(sub, torch.bfloat16)
    assert type(cast_sub) is type(sub) and cast_sub.grad_fn.name() != "csext::InputCastBackward"
    assert EAGER.autocast_input(x, torch.float32) is x
    with pytest.raises(TypeError, match="autocast_input takes"):
        EAGER.autocast_input(x, "bfloat16")
