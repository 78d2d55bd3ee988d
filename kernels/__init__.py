"""Triton kernels of csext, installed as ``csext.kernels``.

One file per op: the ``@triton.jit`` kernels, then their launchers; the autograd glue stays in
``csext/``. No Triton kernel is built yet, so ``csext.backends.available()`` does not list
``"triton"``.
"""
