#!/usr/bin/env bash
# One GPU session in one call (the device is lent by the minute): build csext with its CUDA
# kernels, run the GPU tests, then the benchmarks. Everything lands under $OUT (default
# ./gpu-out), in six files (the device tool returns at most eight): log.txt, pytest.txt (the
# GPU tests' whole report), gpu.csv (bench/run.py), host.csv (bench/host.py), step.csv
# (bench/step.py), and extras.tar.gz with the PNGs and the profile tables (step.py, and run.py
# for the linear layers); bench/triton_launch.py and the autotuned Launcher test print to log.txt.
# It took 7 minutes before those two stages (their timeouts: 120 and 90 s); the device tool stops a call at 10.
# A shorter session: TEST_TIMEOUT=110 LINEAR_PROVIDERS=dense,torch,cuda,triton SKIP_CHANNELS_LAST=1.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
REPO=$PWD
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
stage() { echo "== $(date +%T) $*"; }

stage machine
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

stage build
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 240 python3 -m pip install --no-build-isolation --no-deps -q . || exit 1
SO=$(cd /tmp && python3 -c "import csext._C as c; print(c.__file__)")
cd /tmp && python3 -c "import csext; print('backends', csext.backends.available())"
echo "16-byte loads in the CUDA gate kernels (LDG.E.128):" \
  "$(cuobjdump -sass "$SO" 2>/dev/null | grep -c 'LDG.E.128')"

stage tests
# From /tmp, so that the installed csext (with csext._C) is imported, not the source tree.
cd /tmp && CSEXT_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider -rfEs \
  "$REPO/tests/test_cuda.py" "$REPO/tests/test_triton.py" "$REPO/tests/test_triton_launch.py" \
  "$REPO/tests/test_eager_fast_path.py" >"$OUT/pytest.txt" 2>&1
tail -40 "$OUT/pytest.txt"
# The same Launcher test with autotuning on, as users run: the tuned configuration's launches.
timeout 120 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_triton.py" \
  -k "repeated_calls and 4096" 2>&1 | tail -3

cd "$REPO"
# One invocation per op and layout: each saves its rows when it ends, so a stage cut short by
# its timeout loses only its own rows.
stage bench linear, bf16 autocast
timeout 200 python3 bench/run.py --device cuda --autocast bf16 --shapes gpu --ops linear \
  --compile-ops linear --repeats 8 --providers "${LINEAR_PROVIDERS:-all}" --csv "$OUT/gpu.csv" --plot "$OUT/linear.png" \
  --profile "$OUT/profile-linear"
stage bench host time per layer
timeout 60 python3 bench/host.py --device cuda --autocast bf16 --repeats 10 --calls 50 --csv "$OUT/host.csv"
stage bench host time of the Triton launches
timeout 90 python3 bench/triton_launch.py --device cuda --repeats 10 --calls 200
stage bench ResNet-20 step
for layout in "" --channels-last; do
  timeout 60 python3 bench/step.py --device cuda --model resnet20 --autocast bf16 $layout --csv "$OUT/step.csv" \
    --profile "$OUT/profile${layout:+-channels-last}"
done
stage bench conv, bf16 autocast
timeout 90 python3 bench/run.py --device cuda --autocast bf16 --shapes gpu --ops conv \
  --compile-ops "" --repeats 8 --csv "$OUT/gpu.csv" --plot "$OUT/conv.png"
if [ -z "${SKIP_CHANNELS_LAST:-}" ]; then
  stage bench conv channels_last
  timeout 60 python3 bench/run.py --device cuda --autocast bf16 --shapes gpu --ops conv --channels-last \
    --compile-ops "" --repeats 8 --csv "$OUT/gpu.csv" --plot "$OUT/conv-channels-last.png"
fi
(cd "$OUT" && tar czf extras.tar.gz --remove-files ./*.png profile*)
stage done
