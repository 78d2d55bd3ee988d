"""Triton kernels of csext, installed as ``csext.kernels``.

One file per op: the ``@triton.jit`` kernels, then their launchers; the custom ops and their
autograd are csext/backends/triton.py.

    gate.py           elementwise gate and mask gradient (convolution weights, large-M linear)
    gated_matmul.py   fused gated GEMMs of a linear layer: forward, input and weight gradients
    launch.py         Launcher: a launch that skips Triton's per-call Python once it has compiled
"""
