"""Fused Triton GEMMs of a gated linear layer y = x @ (w * m)^T + b (csext/reference.py):

    forward      y   = x @ w_eff^T + b   each (w, s) tile is gated as it is loaded
    input grad   dx  = G @ w_eff         the same kernel, on the transposed weight
    weight grad  dL/dw = (G^T x) * m,  dL/ds = beta * m * (1 - m) * ((G^T x) * w + lam)
                 from the epilogue of the G^T @ x GEMM, and dL/db = sum of G's rows beside it

so neither w_eff nor dL/dw_eff is ever written to memory. The gate is computed in float32 and
cast to the compute dtype for `tl.dot`; accumulation is float32. Under autocast the activations
may come in another dtype (float32 x): each tile is cast as it is loaded, and the input gradient
is rounded to the compute dtype before it is stored in x's, so the kernels give what autocast's
separate casts of x and of dL/dx give, bit for bit, without those two passes over memory.

The gated tile is the dot's first operand (the kernels compute y^T tile by tile), the operand
Hopper's wgmma can take from registers rather than shared memory; compiled for sm_90 it does
(`python bench/inspect_triton.py` reads the PTX, no GPU needed). One list of configurations, for
sm_80 and sm_90, is autotuned per (M, N, K), dtypes and (the gated GEMM) orientation of w; under
TRITON_INTERPRET=1 (and with CSEXT_TRITON_AUTOTUNE=0) one fixed configuration runs instead. Every
output element is written once, never accumulated into, so autotuning's repeated launches cannot
corrupt it.

Split-K (forward and input gradient, few rows): with M rows of x the forward has only
cdiv(M, BLOCK_X) * cdiv(N, BLOCK_W) output tiles, 32 for M = 256 and N = 4096 with 128 x 256
tiles, too few to keep a GPU's memory busy streaming w and s; smaller row tiles would gate each
weight tile once per row tile. Configurations with SPLIT > 1 give each output tile SPLIT
programs, each over its own part of the reduction. Each stores its float32 partial sum in a
workspace and counts itself in the tile's counter; the last to arrive adds the SPLIT partials
in split order (so the result does not depend on which program came last), adds the bias,
stores the tile and sets the counter back to zero for the next launch. These configurations
are tried only for small outputs (`split_allowed`), where the workspace stays small.
"""

import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver

from .gate import mask_of, soft_mask_and_slope
from .launch import Launcher

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = not INTERPRET and os.environ.get("CSEXT_TRITON_AUTOTUNE", "1") != "0"


def _config(block_w, block_x, block_k, warps, stages, split=None):
    """A configuration; `split` (the number of programs per output tile) for the gated GEMM only."""
    sizes = {"BLOCK_W": block_w, "BLOCK_X": block_x, "BLOCK_K": block_k, "GROUP": 8}
    return triton.Config(sizes if split is None else {**sizes, "SPLIT": split}, num_warps=warps, num_stages=stages)


# BLOCK_W rows of the weight (the gated operand), BLOCK_X rows of the activations, BLOCK_K of
# the reduction. Stages are few because each stage holds float32 w and s tiles beside x's.
GATED_CONFIGS = [
    _config(128, 256, 64, 8, 2, split=1),
    _config(128, 128, 64, 8, 2, split=1),
    _config(128, 128, 32, 4, 4, split=1),
    _config(64, 128, 64, 4, 3, split=1),
    _config(64, 64, 64, 4, 4, split=1),
    _config(64, 32, 64, 4, 4, split=1),
    # Split-K, for few rows: up to 256 rows of x in one tile, so each weight tile is gated once
    # or twice, and 2 or 4 programs per tile (split_allowed says where they are tried).
    _config(128, 256, 64, 8, 2, split=4),
    _config(64, 256, 64, 4, 2, split=2),
    _config(64, 256, 64, 4, 2, split=4),
    _config(64, 128, 64, 4, 3, split=4),
]
MAX_SPLIT = max(config.kwargs["SPLIT"] for config in GATED_CONFIGS)
# The weight-gradient GEMM: BLOCK_W x BLOCK_K output tiles, BLOCK_X rows of the reduction.
WEIGHT_GRAD_CONFIGS = [
    _config(128, 64, 128, 8, 3),
    _config(128, 64, 256, 8, 3),
    _config(128, 32, 128, 4, 4),
    _config(64, 64, 128, 4, 4),
    _config(64, 64, 64, 4, 4),
]
FIXED_CONFIG = {"BLOCK_W": 32, "BLOCK_X": 32, "BLOCK_K": 32, "GROUP": 4}  # interpreter and tests
if not INTERPRET:
    FIXED_CONFIG = {"BLOCK_W": 64, "BLOCK_X": 64, "BLOCK_K": 32, "GROUP": 8}
FIXED_GATED_CONFIG = {**FIXED_CONFIG, "SPLIT": 1}
SPLIT_MAX_PARTIALS = 1 << 23  # split * M * N up to which split-K is tried: a workspace of 32 MiB at most


def split_allowed(M, N, K, block_k, split) -> bool:
    """Whether `split` programs per output tile are tried for out[M, N] with a reduction of K:
    a small output (few tiles, a small workspace) and at least two BLOCK_K steps a program."""
    return split == 1 or (split * M * N <= SPLIT_MAX_PARTIALS and triton.cdiv(K, block_k) >= 2 * split)


def _prune_gated(configs, named_args, **kwargs):
    M, N, K = named_args["M"], named_args["N"], named_args["K"]
    return [c for c in configs if split_allowed(M, N, K, c.kwargs["BLOCK_K"], c.kwargs["SPLIT"])]


@triton.jit
def _tile_ids(rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile), the row tile moving fastest within groups of GROUP
    row tiles: programs running together read the same column tile (from L2)."""
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(rows, BLOCK_ROWS)
    col_tiles = tl.cdiv(cols, BLOCK_COLS)
    in_group = GROUP * col_tiles
    first_row = (pid // in_group) * GROUP
    group_rows = min(row_tiles - first_row, GROUP)
    return first_row + (pid % in_group) % group_rows, (pid % in_group) // group_rows


@triton.jit
def _store_out_tile(acc, bias_ptr, out_ptr, offs_n, offs_m, M, N, stride_om, stride_on,
                    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """out^T tile = acc (+ bias), rounded to DOT_DTYPE, then stored in out's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + offs_m.to(tl.int64)[None, :] * stride_om
    out = acc.to(DOT_DTYPE).to(out_ptr.dtype.element_ty)  # as a cast after a GEMM in DOT_DTYPE would give
    tl.store(out_ptrs, out, mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


@triton.jit
def gated_matmul_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, beta_ptr, partial_ptr, count_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_om, stride_on,
    HARD: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr,
):
    """out[M, N] = x[M, K] @ (w * m)[N, K]^T (+ bias[N]), any strides; x and the gated weight
    enter the dot in DOT_DTYPE, and the result is rounded to it before it is stored in out's.
    Program (tile, split) sums split's share of the BLOCK_K steps; with SPLIT > 1, partial_ptr
    is a float32 (SPLIT, N, M) workspace and count_ptr one int32 zero per output tile."""
    # Programs side by side share a weight tile: its float32 w and s, the widest operands,
    # then come from L2 after the first read instead of from memory once per row tile of x.
    pid_m, pid_n = _tile_ids(M, N, BLOCK_X, BLOCK_W, GROUP)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_m = pid_m * BLOCK_X + tl.arange(0, BLOCK_X)
    offs_k = tl.arange(0, BLOCK_K)
    rows_n = offs_n.to(tl.int64)[:, None]
    rows_m = offs_m.to(tl.int64)[:, None]
    if SPLIT == 1:
        first_step, last_step = 0, tl.cdiv(K, BLOCK_K)
        cols_k = offs_k[None, :]
    else:
        steps_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT)
        first_step = split * steps_per_split
        last_step = min(first_step + steps_per_split, tl.cdiv(K, BLOCK_K))
        cols_k = first_step.to(tl.int64) * BLOCK_K + offs_k[None, :]  # times a stride: 64-bit
    w_ptrs = w_ptr + rows_n * stride_wn + cols_k * stride_wk
    s_ptrs = s_ptr + rows_n * stride_sn + cols_k * stride_sk
    x_ptrs = x_ptr + rows_m * stride_xm + cols_k * stride_xk
    beta = tl.load(beta_ptr)
    acc = tl.zeros((BLOCK_W, BLOCK_X), dtype=tl.float32)
    for step in range(first_step, last_step):
        k_inside = offs_k[None, :] < K - step * BLOCK_K
        w_inside = (offs_n[:, None] < N) & k_inside
        w = tl.load(w_ptrs, mask=w_inside, other=0.0).to(tl.float32)
        s = tl.load(s_ptrs, mask=w_inside, other=0.0)
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_inside, other=0.0).to(DOT_DTYPE)
        w_eff = (w * mask_of(s, beta, HARD)).to(DOT_DTYPE)
        acc = tl.dot(w_eff, tl.trans(x), acc, input_precision=PRECISION)  # out^T tile
        w_ptrs += BLOCK_K * stride_wk
        s_ptrs += BLOCK_K * stride_sk
        x_ptrs += BLOCK_K * stride_xk
    if SPLIT == 1:
        _store_out_tile(acc, bias_ptr, out_ptr, offs_n, offs_m, M, N, stride_om, stride_on, HAS_BIAS, DOT_DTYPE)
    else:
        inside = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        split_stride = N * M  # split * N * M <= SPLIT_MAX_PARTIALS: no overflow
        partial_ptrs = partial_ptr + rows_n * M + offs_m[None, :]  # split 0's partial
        tl.store(partial_ptrs + split * split_stride, acc, mask=inside)
        tl.debug_barrier()  # every thread's partial stored before the count releases them
        count_ptrs = count_ptr + pid_n * tl.cdiv(M, BLOCK_X) + pid_m
        arrived = tl.atomic_add(count_ptrs, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:  # the tile's last program: every partial is in the workspace
            acc = tl.zeros((BLOCK_W, BLOCK_X), dtype=tl.float32)
            for part in tl.static_range(SPLIT):  # in split order, whichever program came last
                acc += tl.load(partial_ptrs + part * split_stride, mask=inside, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count_ptrs, 0, sem="relaxed", scope="gpu")  # zero again for the next launch
            _store_out_tile(acc, bias_ptr, out_ptr, offs_n, offs_m, M, N, stride_om, stride_on, HAS_BIAS,
                            DOT_DTYPE)


@triton.jit
def gated_weight_grad_kernel(
    grad_ptr, x_ptr, w_ptr, s_ptr, grad_w_ptr, grad_s_ptr, grad_b_ptr, beta_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
    penalty,
    HARD: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_MASK: tl.constexpr, NEED_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """D = grad[M, N]^T @ x[M, K] tile by tile, in grad's dtype (x's tiles cast to it); the
    epilogue writes dL/dw = D * m (w's dtype and strides) and, for a soft mask,
    dL/ds = beta * m * (1 - m) * (D * w + penalty) (s's). With NEED_BIAS the programs of the
    first column of tiles also write dL/db[N] = the float32 sum of grad's rows (bias's dtype)."""
    pid_n, pid_k = _tile_ids(N, K, BLOCK_W, BLOCK_K, GROUP)
    offs_n = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_X)
    g_ptrs = grad_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_W, BLOCK_K), dtype=tl.float32)
    grad_b = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for step in range(0, tl.cdiv(M, BLOCK_X)):
        m_inside = offs_m[:, None] < M - step * BLOCK_X
        g = tl.load(g_ptrs, mask=m_inside & (offs_n[None, :] < N), other=0.0)
        x = tl.load(x_ptrs, mask=m_inside & (offs_k[None, :] < K), other=0.0).to(g.dtype)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        # The G tile is loaded already: its column sums cost no memory traffic. Only the first
        # column of tiles stores them, so only it sums.
        if NEED_BIAS:
            if pid_k == 0:
                grad_b += tl.sum(g.to(tl.float32), axis=0)
        g_ptrs += BLOCK_X * stride_gm
        x_ptrs += BLOCK_X * stride_xm
    if NEED_BIAS:
        if pid_k == 0:
            tl.store(grad_b_ptr + offs_n, grad_b.to(grad_b_ptr.dtype.element_ty), mask=offs_n < N)
    inside = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    rows_n = offs_n.to(tl.int64)[:, None]
    s = tl.load(s_ptr + rows_n * stride_sn + offs_k[None, :] * stride_sk, mask=inside, other=0.0)
    beta = tl.load(beta_ptr)
    if HARD:
        m = mask_of(s, beta, True)
    else:
        m, slope = soft_mask_and_slope(s, beta)
    if NEED_WEIGHT:
        grad_w = (acc * m).to(grad_w_ptr.dtype.element_ty)
        tl.store(grad_w_ptr + rows_n * stride_wn + offs_k[None, :] * stride_wk, grad_w, mask=inside)
    if NEED_MASK and not HARD:
        w = tl.load(w_ptr + rows_n * stride_wn + offs_k[None, :] * stride_wk, mask=inside, other=0.0)
        grad_s = beta * slope * (acc * w.to(tl.float32) + penalty)
        tl.store(grad_s_ptr + rows_n * stride_sn + offs_k[None, :] * stride_sk, grad_s, mask=inside)


# stride_wk tells the forward (w read along its rows) from the input gradient (along its columns),
# which may take different configurations at the same M, N, K and dtypes.
gated_matmul_tuned = triton.autotune(GATED_CONFIGS, key=["M", "N", "K", "stride_wk"],
                                     prune_configs_by={"early_config_prune": _prune_gated})(gated_matmul_kernel)
gated_weight_grad_tuned = triton.autotune(WEIGHT_GRAD_CONFIGS, key=["M", "N", "K"])(gated_weight_grad_kernel)


# The autotuned kernels, or the plain ones with FIXED_CONFIG added to their constexprs.
_launch_matmul = Launcher(gated_matmul_kernel, gated_matmul_tuned if AUTOTUNE else None)
_launch_weight_grad = Launcher(gated_weight_grad_kernel, gated_weight_grad_tuned if AUTOTUNE else None)
_launch_matmul_as_given = Launcher(gated_matmul_kernel)  # gated_matmul(config=...): tests and bench/
_MATMUL_CONFIG = {} if AUTOTUNE else FIXED_GATED_CONFIG
_CONFIG = {} if AUTOTUNE else FIXED_CONFIG


def _tile_grid(rows, cols, row_block, col_block):
    return lambda meta: (triton.cdiv(rows, meta[row_block]) * triton.cdiv(cols, meta[col_block]),)


def _split_grid(rows, cols):
    """(output tiles, SPLIT programs each): the gated GEMM's grid."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_X"]) * triton.cdiv(cols, meta["BLOCK_W"]), meta["SPLIT"])


_tile_counters: dict = {}  # (device index, stream) -> int32 zeros, which the split kernels leave zeroed


def _zeroed_counters(device: torch.device, size: int) -> torch.Tensor:
    """At least `size` int32 zeros for a split kernel's per-tile counts: one tensor per device and
    stream (the kernels of one stream never overlap), or a fresh one in a CUDA graph being
    captured (kept in the graph's memory pool: a cached tensor could be replaced, and its memory
    reused, while the graph still replays)."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(size, dtype=torch.int32, device=device)
        key = (device.index, driver.active.get_current_stream(device.index))  # as the Launcher reads it
    else:
        key = (None, None)
    counters = _tile_counters.get(key)
    if counters is None or counters.numel() < size:
        counters = _tile_counters[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return counters


def _workspace_splits(M, N, K, config) -> int:
    """The most programs per output tile the launch may take: the given or fixed configuration's,
    or the most of the autotuned configurations tried for this shape."""
    return config["SPLIT"] if config else _most_splits_tried(M, N, K)


@functools.lru_cache(maxsize=1024)  # once per shape, not per call: eager calls at few rows are host-bound
def _most_splits_tried(M, N, K) -> int:
    kwargs = (c.kwargs for c in GATED_CONFIGS)
    return max(kw["SPLIT"] for kw in kwargs if split_allowed(M, N, K, kw["BLOCK_K"], kw["SPLIT"]))


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def gated_matmul(x, weight, mask_logits, beta, bias, out, hard: bool, precision: str, dot_dtype: torch.dtype,
                 transposed: bool = False, config: dict | None = None) -> None:
    """out[M, N] = x[M, K] @ (weight * m)[N, K]^T (+ bias), the GEMM in `dot_dtype` (x and out
    may have others), any strides. With `transposed`, weight and mask_logits are read as their
    transposes, (K, N): the input gradient G @ (w * m), without a view op for each. `config`
    (BLOCK_W, BLOCK_X, BLOCK_K, GROUP, SPLIT, and optionally num_warps and num_stages) replaces
    the autotuned or fixed configuration."""
    (M, K), N = x.shape, weight.shape[1 if transposed else 0]
    if M == 0 or N == 0:
        return
    if K == 0:
        out.copy_(bias.expand_as(out) if bias is not None else out.new_zeros(()).expand_as(out))
        return
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else out  # the epilogue reads it densely; else a placeholder
    launch = _launch_matmul if config is None else _launch_matmul_as_given
    config = config or _MATMUL_CONFIG
    splits = _workspace_splits(M, N, K, config)
    if splits > 1:
        partials = out.new_empty((splits, N, M), dtype=torch.float32)
        counters = _zeroed_counters(out.device, triton.cdiv(M, 16) * triton.cdiv(N, 16))  # blocks are >= 16
    else:
        partials = counters = out  # placeholders: no configuration tried here reads them
    tensors = (x, weight, mask_logits, bias, out, beta, partials, counters)
    w_strides, s_strides = weight.stride(), mask_logits.stride()
    if transposed:
        w_strides, s_strides = w_strides[::-1], s_strides[::-1]
    ints = (M, N, K, *x.stride(), *w_strides, *s_strides, *out.stride())
    flags = dict(HARD=hard, HAS_BIAS=has_bias, PRECISION=precision, DOT_DTYPE=_TRITON_DTYPES[dot_dtype], **config)
    launch(_split_grid(M, N), tensors, ints, (), flags)


def gated_weight_grad(grad, x, weight, mask_logits, beta, penalty: float, grad_weight, grad_mask_logits,
                      grad_bias, hard: bool, precision: str) -> None:
    """grad_weight = (grad^T @ x) * m, unless hard grad_mask_logits (docs/contract.md section 1), and
    grad_bias = grad.sum(0) (summed in float32); any may be None when not needed. The GEMM runs
    in grad's dtype, whatever x's. The outputs have the strides of weight and mask_logits."""
    (M, N), K = grad.shape, x.shape[1]
    need_weight, need_mask = grad_weight is not None, grad_mask_logits is not None and not hard
    need_bias = grad_bias is not None
    if M == 0 or N == 0 or K == 0:  # no rows: D = 0; no weights: nothing but dL/db
        if need_weight:
            grad_weight.zero_()
        if need_mask:
            grad_mask_logits.copy_(penalty * beta * _slope(mask_logits, beta))
        if need_bias:
            grad_bias.copy_(grad.sum(0, dtype=torch.float32))
        return
    placeholder = next(t for t in (grad_weight, grad_mask_logits, grad_bias) if t is not None)
    tensors = (grad, x, weight, mask_logits, grad_weight if need_weight else placeholder,
               grad_mask_logits if need_mask else placeholder, grad_bias if need_bias else placeholder, beta)
    ints = (M, N, K, *grad.stride(), *x.stride(), *weight.stride(), *mask_logits.stride())
    flags = dict(HARD=hard, NEED_WEIGHT=need_weight, NEED_MASK=need_mask, NEED_BIAS=need_bias, PRECISION=precision,
                 **_CONFIG)
    _launch_weight_grad(_tile_grid(N, K, "BLOCK_W", "BLOCK_K"), tensors, ints, (float(penalty),), flags)


def _slope(mask_logits, beta):
    m = (beta * mask_logits).sigmoid()
    return m * (1 - m)
