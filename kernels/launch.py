"""Launching this package's Triton kernels without Triton's per-call Python.

`kernel[grid](*args)` redoes on every call what the compiled binary needs: it binds the
arguments, specializes each one (a tensor's dtype and 16-byte alignment, an integer's size and
divisibility), hashes that into its cache key and, for an autotuned kernel, looks up the tuned
configuration; a small layer on a GPU pays that in full (bench/triton_launch.py). A `Launcher`
pays it once per distinct call: it keeps the compiled kernel under a key that fixes Triton's
specialization (every tensor's dtype and alignment, every integer and constexpr by value; floats
are never specialized), and later calls with that key go straight to the binary through
`CompiledKernel.run`, with the launch hooks, so profilers still see every launch.

Every launch asks for FMA contraction (`OPTIONS`), as inductor and nvcc compile, whatever
Triton's default. Triton settings changed after a call's first launch do not reach the binary
kept for it. Under TRITON_INTERPRET=1 there is no binary: every call goes through Triton.
"""

import threading

from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:
    from triton.knobs import HookChain
except ImportError:  # a Triton whose hooks are plain callables, None when unset
    HookChain = None

OPTIONS = {"enable_fp_fusion": True}  # Triton's compile options for every kernel of csext's
MAX_ENTRIES = 256  # distinct calls kept per kernel (shapes vary at inference); then it starts over


def _hook(hook):
    """A launch hook as the binary's launcher takes it: None where it would call nothing (an unset
    hook is an empty HookChain, which Triton's own launch would still build metadata for)."""
    if HookChain is not None and isinstance(hook, HookChain) and not hook.calls:
        return None
    return hook


class Launcher:
    """Launches `kernel`, a @triton.jit function whose parameters are its tensors, then its
    integers, then its floats, then its constexprs; or, given `tuned`, kernel's autotuned form."""

    def __init__(self, kernel, tuned=None):
        self.kernel, self.tuned = kernel, tuned
        self.names = kernel.arg_names
        self.binaries: dict = {}
        self.first_launch = threading.Lock()
        self.compiled = isinstance(kernel, JITFunction)  # not the interpreter's InterpretedFunction

    def __call__(self, grid, tensors: tuple, ints: tuple, floats: tuple, constexprs: dict) -> None:
        """grid(meta) -> up to three grid sizes, meta holding the constexprs (and the tuned
        configuration's block sizes); `constexprs` may hold launch options (num_warps) too."""
        if not self.compiled:
            (self.tuned or self.kernel)[grid](*tensors, *ints, *floats, **constexprs, **OPTIONS)
            return
        device = driver.active.get_current_device()
        key = (device, ints, *constexprs.values(), *[(t.dtype, t.data_ptr() % 16 == 0) for t in tensors])
        found = self.binaries.get(key)
        if found is None:
            self._launch_through_triton(key, grid, tensors, ints, floats, constexprs)
            return
        binary, grid_xyz, tail = found
        stream = driver.active.get_current_stream(device)
        args = (*tensors, *ints, *floats, *tail)
        enter_hook, exit_hook = _hook(knobs.runtime.launch_enter_hook), _hook(knobs.runtime.launch_exit_hook)
        no_hooks = enter_hook is None and exit_hook is None
        metadata = None if no_hooks else binary.launch_metadata(grid_xyz, stream, *args)
        binary.run(grid_xyz[0], grid_xyz[1], grid_xyz[2], stream, binary.function, binary.packed_metadata,
                   metadata, enter_hook, exit_hook, *args)

    def _launch_through_triton(self, key, grid, tensors, ints, floats, constexprs) -> None:
        """Launch as Triton does (compiling and autotuning as needed) and keep the binary."""
        args = (*tensors, *ints, *floats)
        with self.first_launch:  # no other thread autotunes between the launch and best_config
            if self.tuned is not None:
                binary = self.tuned[grid](*args, **constexprs, **OPTIONS)
                meta = {**constexprs, **self.tuned.best_config.kwargs}
            else:
                binary = self.kernel[grid](*args, **constexprs, **OPTIONS)
                meta = constexprs
        if not isinstance(binary, CompiledKernel):  # compiled asynchronously: keep nothing
            return
        # The launcher takes every parameter in order, constexprs included (it skips them).
        tail = tuple(meta[name] for name in self.names[len(args):])
        grid_xyz = (*grid(meta), 1, 1)[:3]
        if len(self.binaries) >= MAX_ENTRIES:
            self.binaries.clear()
        self.binaries[key] = (binary, grid_xyz, tail)
