"""Elementwise Triton kernels of the CS gate (csext/reference.py), over flat storage:

    forward   w_eff = w * m,  m = sigmoid(beta * s)  (soft)  or  m = 1[s > 0]  (hard)
    backward  dL/dw = G * m,  dL/ds = beta * m * (1 - m) * (G * w + lam)

With one logit per row of `cols` weights (channel granularity) m is the row's, and the backward
runs one program per row that sums the dL/ds terms of its weights as it writes their dL/dw.

They serve convolution weights and the linear shapes where the fused GEMM does not pay
(kernels/gated_matmul.py). beta is read from a 0-dim float32 tensor on the device, so that a
changing beta neither recompiles the kernel nor a torch.compile graph. Each output element is
written exactly once: autotuning or a relaunch can never corrupt an output.
"""

import triton
import triton.language as tl

from .launch import Launcher

BLOCK = 1024


@triton.jit
def soft_mask_and_slope(s, beta):
    """m = sigmoid(beta * s) and m * (1 - m), from z = exp(-|x|): no overflow, and 1 - m stays
    accurate where m rounds to 1. NaN fails x >= 0 and takes z * r, which is NaN."""
    x = beta * s
    z = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + z)
    zr = z * r
    return tl.where(x >= 0, r, zr), zr * r


@triton.jit
def mask_of(s, beta, HARD: tl.constexpr):
    """The soft mask, or with HARD the ticket mask 1[s > 0] with NaN passed through."""
    if HARD:
        m = tl.where(s > 0, 1.0, tl.where(s <= 0, 0.0, s))
    else:
        m, _ = soft_mask_and_slope(s, beta)
    return m


@triton.jit
def gate_forward_kernel(w_ptr, s_ptr, out_ptr, beta_ptr, n, cols, HARD: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    beta = tl.load(beta_ptr)
    if ROWS:
        s = tl.load(s_ptr + offsets // cols, mask=inside)
    else:
        s = tl.load(s_ptr + offsets, mask=inside)
    w = tl.load(w_ptr + offsets, mask=inside).to(tl.float32)
    tl.store(out_ptr + offsets, (w * mask_of(s, beta, HARD)).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def gate_backward_kernel(grad_ptr, w_ptr, s_ptr, grad_w_ptr, grad_s_ptr, beta_ptr, n, penalty,
                         BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    beta = tl.load(beta_ptr)
    s = tl.load(s_ptr + offsets, mask=inside)
    w = tl.load(w_ptr + offsets, mask=inside).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=inside).to(tl.float32)
    m, slope = soft_mask_and_slope(s, beta)
    tl.store(grad_w_ptr + offsets, (g * m).to(grad_w_ptr.dtype.element_ty), mask=inside)
    tl.store(grad_s_ptr + offsets, beta * slope * (g * w + penalty), mask=inside)


@triton.jit
def gate_rows_backward_kernel(grad_ptr, w_ptr, s_ptr, grad_w_ptr, grad_s_ptr, beta_ptr, rows, cols, penalty,
                              BLOCK: tl.constexpr):
    """One of `rows` rows of `cols` weights under one logit each (a program per row): dL/dw = G * m,
    and dL/ds = beta * m * (1 - m) * (sum_j G_j w_j + cols * lam)."""
    row = tl.program_id(0).to(tl.int64)
    beta = tl.load(beta_ptr)
    m, slope = soft_mask_and_slope(tl.load(s_ptr + row), beta)
    dot = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, cols, BLOCK):
        offsets = row * cols + start + tl.arange(0, BLOCK)
        inside = start + tl.arange(0, BLOCK) < cols
        w = tl.load(w_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(grad_w_ptr + offsets, (g * m).to(grad_w_ptr.dtype.element_ty), mask=inside)
        dot += g * w
    tl.store(grad_s_ptr + row, beta * slope * (tl.sum(dot, axis=0) + cols * penalty))


_launch_forward = Launcher(gate_forward_kernel)
_launch_backward = Launcher(gate_backward_kernel)
_launch_rows_backward = Launcher(gate_rows_backward_kernel)


def _grid(n):
    return lambda meta: (triton.cdiv(n, BLOCK),)


def gate_forward(weight, mask_logits, beta, out, hard: bool) -> None:
    """out = weight * m over the flat storage of same-layout dense tensors, mask_logits one per
    weight or one per row (its numel that of weight's first dimension); beta a device tensor."""
    n = weight.numel()
    if n:
        cols = n // mask_logits.numel()
        _launch_forward(_grid(n), (weight, mask_logits, out, beta), (n, cols), (),
                        dict(HARD=hard, ROWS=cols != 1, BLOCK=BLOCK, num_warps=4))


def gate_backward(grad, weight, mask_logits, beta, penalty: float, grad_weight, grad_mask_logits) -> None:
    """(dL/dw, dL/ds) of the soft gate into grad_weight and grad_mask_logits."""
    n = weight.numel()
    if not n:
        return
    cols = n // mask_logits.numel()
    if cols == 1:
        _launch_backward(_grid(n), (grad, weight, mask_logits, grad_weight, grad_mask_logits, beta), (n,),
                         (float(penalty),), dict(BLOCK=BLOCK, num_warps=4))
    else:
        rows = mask_logits.numel()  # an int of the launch, as the grid depends on it
        _launch_rows_backward(lambda meta: (rows,),
                              (grad, weight, mask_logits, grad_weight, grad_mask_logits, beta), (rows, cols),
                              (float(penalty),), dict(BLOCK=BLOCK, num_warps=4))
