"""Triton kernels of csext, installed as ``csext.kernels``.

One file per op: the ``@triton.jit`` kernels, then their launchers; the autograd glue (custom
ops for torch.compile; for eager calls csext._C's nodes, or autograd.Function) is
csext/_triton.py.

    gate.py           elementwise gate and mask gradient (convolution weights, large-M linear)
    gated_matmul.py   fused gated GEMMs of a linear layer: forward, input and weight gradients
    launch.py         Launcher: a launch that skips Triton's per-call Python once it has compiled
"""
