#!/usr/bin/env bash
# One GPU session in one call (the device is lent by the minute): build csext with its CUDA
# kernels, run the GPU tests, then the benchmarks, most decisive first. Everything lands under
# $OUT (default ./gpu-out), in six files (the device tool returns at most eight): log.txt,
# pytest.txt (the GPU tests' whole report), gpu.csv (bench/run.py), host.csv (bench/host.py),
# step.csv (bench/step.py), and extras.tar.gz with the PNGs and the profile tables (step.py, and
# run.py for the linear layers); bench/gate_launch.cu, bench/fused_gemm.py, bench/triton_launch.py
# and the autotuned Launcher test print to log.txt. The whole script keeps to BUDGET_S seconds
# (default 470, under 8 minutes, which leaves time for one rerun of device time): each stage's
# timeout is cut to the time left, and a stage with under 20 s left is skipped, so the results
# written so far and the archive always come back. A shorter session: BUDGET_S=300, or
# LINEAR_PROVIDERS=dense,torch,cuda,triton SKIP_CHANNELS_LAST=1.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
REPO=$PWD
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-470} ))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
stage() { echo "== $(date +%T) $*"; }

# within SECONDS COMMAND...: COMMAND under `timeout`, at most SECONDS and at most the time left
# before the deadline (less 15 s for the archive); skipped, and says so, under 20 s.
within() {
  local want=$1 left=$(( DEADLINE - $(date +%s) - 15 ))
  shift
  if (( left < 20 )); then
    echo "skipped, ${left}s left of BUDGET_S: $*"
    return 124
  fi
  timeout $(( want < left ? want : left )) "$@"
}

stage machine
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

stage build
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 within 240 python3 -m pip install --no-build-isolation --no-deps -q . || exit 1
SO=$(cd /tmp && python3 -c "import csext._C as c; print(c.__file__)")
cd /tmp && python3 -c "import csext; print('backends', csext.backends.available())"
echo "16-byte loads in the CUDA gate kernels (LDG.E.128):" \
  "$(cuobjdump -sass "$SO" 2>/dev/null | grep -c 'LDG.E.128')"

stage tests
# From /tmp, so that the installed csext (with csext._C) is imported, not the source tree; in
# eight processes where pytest-xdist is there (Triton compiles on the CPU, one kernel at a time).
PARALLEL=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
cd /tmp && CSEXT_TRITON_AUTOTUNE=0 within "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider -rfEs $PARALLEL \
  "$REPO/tests/test_cuda_graphs.py" "$REPO/tests/test_cuda.py" "$REPO/tests/test_triton.py" \
  "$REPO/tests/test_triton_launch.py" "$REPO/tests/test_package.py" \
  "$REPO/tests/test_hf_conv1d.py::test_gated_hf_conv1d_on_each_fused_backend_follows_the_comparison_rule" \
  "$REPO/tests/test_conv1d.py::test_gated_conv1d_on_each_fused_backend_follows_the_comparison_rule" \
  "$REPO/tests/test_attention.py::test_gated_attention_on_each_fused_backend_follows_the_comparison_rule" \
  "$REPO/tests/test_ops_and_compile.py::test_functorch_transforms_match_torch_backend" \
  "$REPO/tests/test_ops_and_compile.py::test_double_backward" \
  "$REPO/tests/test_ops_and_compile.py::test_hessian_matches_torch_backend" \
  "$REPO/tests/test_ops_and_compile.py::test_forward_over_reverse_matches_torch_backend" >"$OUT/pytest.txt" 2>&1
tail -40 "$OUT/pytest.txt"

# The command line on the GPU, as users run it: a short ResNet-20 search under bf16, then fp16, autocast on
# generated images (the device has no mnist1d), then its saved ticket reloaded and evaluated.
stage search on cuda, bf16 and fp16 autocast
python3 -c "
import numpy as np
rng = np.random.default_rng(0)
centers = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
y_train, y_test = rng.integers(0, 4, 1024), rng.integers(0, 4, 256)
np.savez('/tmp/images.npz', x_train=centers[y_train] + rng.normal(size=(1024, 3, 8, 8)).astype(np.float32),
         y_train=y_train, x_test=centers[y_test] + rng.normal(size=(256, 3, 8, 8)).astype(np.float32), y_test=y_test)"
for amp in bf16 fp16; do
  rm -rf /tmp/cuda-search && cd /tmp && within 90 python3 -m csext search --data /tmp/images.npz --model resnet20 \
    --device cuda --amp $amp --rounds 2 --epochs 3 --batch-size 64 --quiet --out /tmp/cuda-search && python3 -c "
import json
from csext.experiments import data, search
results = json.load(open('/tmp/cuda-search/results.json'))
config = search.SearchConfig(data='/tmp/images.npz', device='cuda', amp='$amp')
ticket = search.load_network('/tmp/cuda-search/ticket-2.pt', device='cuda')
print('$amp: backend', results['environment']['backend'], 'ticket 2 reloaded:',
      search.evaluate(ticket, data.load('/tmp/images.npz'), config),
      'results.json:', results['tickets'][-1]['test_acc'])"
done

cd "$REPO"
stage bench launch configurations of the CUDA gate kernels
nvcc -std=c++17 -O3 -arch=sm_90 bench/gate_launch.cu -o /tmp/gate_launch && within 60 /tmp/gate_launch

# One invocation per op and layout, each saving its rows case by case, so a stage cut short by
# its timeout loses only the case it was in. Mode graph replays a CUDA graph of forward+backward:
# the GPU's time without the host's (run last in each case, on the layers already compiled).
# The targets are forward+backward: modes full and graph only (M = 256 is host-bound, so noisy).
stage bench linear, bf16 autocast
within 200 python3 bench/run.py --device cuda --autocast bf16 --shapes gpu --ops linear \
  --modes full,graph --compile-ops linear --repeats 16 --providers "${LINEAR_PROVIDERS:-all}" --csv "$OUT/gpu.csv" --plot "$OUT/linear.png" \
  --profile "$OUT/profile-linear"
# Each configuration of the fused GEMM (split-K among them), alone, against the gate + cuBLAS.
stage bench fused GEMM configurations
within 60 python3 bench/fused_gemm.py --device cuda --rows 256,1024 --repeats 50
# Twice the linear layers' samples: the per-layer conv ratios are host-bound and noisy.
stage bench conv, bf16 autocast
within 90 python3 bench/run.py --device cuda --autocast bf16 --shapes gpu --ops conv \
  --modes fwd,bwd,full,graph --compile-ops "" --repeats 16 --csv "$OUT/gpu.csv" --plot "$OUT/conv.png"
if [ -z "${SKIP_CHANNELS_LAST:-}" ]; then
  stage bench conv channels_last
  within 90 python3 bench/run.py --device cuda --autocast bf16 --shapes gpu --ops conv --channels-last \
    --modes fwd,bwd,full,graph --compile-ops "" --repeats 16 --csv "$OUT/gpu.csv" --plot "$OUT/conv-channels-last.png"
fi
stage bench ResNet-20 step
for layout in "" --channels-last; do
  within 60 python3 bench/step.py --device cuda --model resnet20 --autocast bf16 $layout --csv "$OUT/step.csv" \
    --profile "$OUT/profile${layout:+-channels-last}"
done
stage bench host time per layer
within 60 python3 bench/host.py --device cuda --autocast bf16 --repeats 10 --calls 50 --csv "$OUT/host.csv"
# The Launcher test with autotuning on, as users run: the tuned configuration's launches.
stage tests, autotuned
cd /tmp && within 120 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_triton.py" \
  -k "repeated_calls and 4096" 2>&1 | tail -3
# Last: it takes what time is left.
cd "$REPO"
stage bench host time of the Triton launches
within 90 python3 bench/triton_launch.py --device cuda --repeats 15 --calls 100  # 100 calls: the launch queue never fills
cd "$OUT" && tar czf extras.tar.gz --remove-files ./*.png profile* 2>/dev/null
stage done
