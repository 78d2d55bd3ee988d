"""The commands the README gives a user run and produce what they promise."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import csext

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    name = f"_csext_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_readme_training_loop_runs_and_prunes(capsys):
    """README, "The layers in your own training loop": its code as written, on a small loader."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The layers in your own training loop"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    torch.manual_seed(0)
    x = torch.randn(256, 784)
    y = (x[:, :10].argmax(1))  # 10 classes read from 10 of the 784 features
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    scope = {"epochs": 4, "loader": loader}
    exec(compile(code, "README.md", "exec"), scope)
    assert "total" in capsys.readouterr().out  # the sparsity report
    dense = scope["dense"]
    assert [type(m).__name__ for m in dense] == ["Linear", "ReLU", "Linear"]
    kept = sum(int(m.weight.count_nonzero()) for m in dense if hasattr(m, "weight"))
    assert 0 < kept < sum(m.weight.numel() for m in dense if hasattr(m, "weight"))


def test_quickstart_sparsifies_and_keeps_accuracy(capsys):
    quickstart = _load(ROOT / "examples" / "quickstart.py")
    result = quickstart.main(["--epochs", "6", "--train-size", "6000"])
    out = capsys.readouterr().out
    assert "remaining" in out and "ticket (hard mask)" in out
    assert 0.0 < result["remaining"] < 0.5  # CS removed most of the weights...
    assert result["ticket_acc"] > 0.6  # ...and the ticket still classifies (chance is 0.1)


def test_bench_appends_rows_and_draws_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench = _load(ROOT / "bench" / "run.py")
    results = tmp_path / "results.csv"
    for _ in range(2):  # the second run appends under the same header
        assert bench.main(["--quick", "--repeats", "2", "--warmup", "1", "--providers", "dense,torch",
                           "--modes", "fwd,full", "--csv", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| linear | M=8 K=97 N=43 | fwd |" in out
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * 2  # runs x ops x modes x providers
    assert {r["provider"] for r in rows} == {"dense", "torch"}
    assert all(r["ratio_to_dense"] == "1.000" for r in rows if r["provider"] == "dense")
    assert all(float(r["median_ms"]) > 0 and r["torch"] and r["commit"] for r in rows)
    assert {r["layout"] for r in rows} == {"contiguous"}
    png = tmp_path / "cpu-float32.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    assert bench.main(["--plot-only", "--csv", str(results)]) == 0  # redrawn from the CSV alone
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no cpu float32 channels_last rows"):
        bench.main(["--plot-only", "--channels-last", "--csv", str(results)])


def test_bench_under_autocast_labels_its_rows(tmp_path):
    bench = _load(ROOT / "bench" / "run.py")
    results = tmp_path / "results.csv"
    assert bench.main(["--quick", "--ops", "linear", "--repeats", "2", "--warmup", "1", "--providers",
                       "dense,torch", "--modes", "full", "--autocast", "bf16", "--csv", str(results),
                       "--profile", str(tmp_path / "profile")]) == 0
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["dtype"] for r in rows} == {"autocast-bf16"} and len(rows) == 2
    for provider in ("dense", "torch"):  # one operator table per case and provider
        text = (tmp_path / "profile" / f"profile-linear-M_8_K_97_N_43-{provider}.txt").read_text()
        assert text.startswith(f"linear-M_8_K_97_N_43-{provider}: wall") and "by self CPU time" in text


def test_bench_graph_mode_needs_cuda(tmp_path, capsys):
    bench = _load(ROOT / "bench" / "run.py")
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--modes", "full,graph", "--csv", str(tmp_path / "results.csv")])
    assert "--modes graph: CUDA graphs need --device cuda" in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()


def test_profile_summary_counts_each_kernel_once():
    """A kernel is a device event, and the operator that launched it carries its time too (as
    key_averages() gives them): the GPU-busy share counts the kernel once."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    bench = _load(ROOT / "bench" / "run.py")
    events = [SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=30.0, is_user_annotation=False),
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=30.0, is_user_annotation=False),
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=5.0, is_user_annotation=True)]
    assert bench.kernel_time_us(events) == 30.0


def test_step_bench_times_dense_and_cs_steps(tmp_path, capsys):
    step = _load(ROOT / "bench" / "step.py")
    results = tmp_path / "step.csv"
    assert step.main(["--device", "cpu", "--model", "conv4", "--batch", "2", "--repeats", "2", "--warmup", "1",
                      "--csv", str(results), "--profile", str(tmp_path / "profile")]) == 0
    with open(results, newline="") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dense"} | {f"cs-{b}" for b in ("torch", "cpp") if b in csext.backends.available()}
    assert rows["dense"]["ratio_to_dense"] == "1.000"
    assert all(float(r["median_ms"]) > 0 for r in rows.values())
    assert "cs-torch" in capsys.readouterr().out
    for provider in rows:
        text = (tmp_path / "profile" / f"profile-{provider}.txt").read_text()
        assert text.startswith(f"{provider}: wall") and "by self CPU time" in text


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_host_bench_times_each_backend_against_the_plain_layer(tmp_path, autocast):
    host = _load(ROOT / "bench" / "host.py")
    results = tmp_path / "host.csv"
    extra = ["--autocast", autocast] if autocast else []
    assert host.main(["--device", "cpu", "--repeats", "2", "--calls", "2", "--csv", str(results)] + extra) == 0
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["dtype"] for r in rows} == {f"autocast-{autocast}" if autocast else "float32"}
    backends = {"dense"} | {b for b in ("torch", "cpp") if b in csext.backends.available()}
    assert {(r["layer"].split()[0], r["provider"]) for r in rows} == {(l, b) for l in ("linear", "conv") for b in backends}
    assert all(float(r["median_us"]) > 0 for r in rows)
    assert {r["extra_us"] for r in rows if r["provider"] == "dense"} == {"0.00"}


# Shared memory a thread block may hold (KiB): A100 (sm_80) and H100 (sm_90).
SHARED_LIMIT_KIB = {80: 163, 90: 227}


@pytest.mark.parametrize("arch", [80, 90])
def test_every_autotuned_triton_config_compiles(arch):
    """Every autotuned configuration of the fused GEMMs compiles for sm_80 and sm_90 here,
    without a GPU, within the architecture's shared memory; on sm_90 each uses wgmma, and the
    forward takes the gated tile as the register operand; each split-K one hands its partial
    sums on in the order the memory model needs, which the interpreter cannot show (a
    subprocess: the tests run Triton's interpreter, which does not compile)."""
    pytest.importorskip("triton")
    kernels = pytest.importorskip("csext.kernels.gated_matmul")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "inspect_triton.py"), "--arch", str(arch)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| forward", "| weight grad"))]
    assert len(rows) == len(kernels.GATED_CONFIGS) + len(kernels.WEIGHT_GRAD_CONFIGS)
    for row in rows:
        name, tile, wgmma, mma_sync, operand, shared, _, handoff = (cell.strip() for cell in row.strip("|").split("|"))
        assert int(shared.split()[0]) <= SHARED_LIMIT_KIB[arch], row
        assert handoff == ("ordered" if "split" in tile else "-"), row
        if arch == 90:
            assert int(wgmma) > 0 and mma_sync == "0", row
            if name.startswith("forward"):
                assert operand == "registers", row
        else:
            assert int(mma_sync) > 0, row


def test_fused_gemm_bench_times_every_configuration_tried(capsys):
    """bench/fused_gemm.py on the CPU (Triton's interpreter): a row for each baseline and for each
    configuration that autotuning tries at that shape, split-K ones among them."""
    kernels = pytest.importorskip("csext.kernels.gated_matmul")
    assert _load(ROOT / "bench" / "fused_gemm.py").main(["--device", "cpu", "--rows", "8", "--repeats", "1"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 8 |")]
    tried = [c.kwargs for c in kernels.GATED_CONFIGS]
    tried = [kw for kw in tried if kernels.split_allowed(8, 256, 256, kw["BLOCK_K"], kw["SPLIT"])]
    assert any(kw["SPLIT"] > 1 for kw in tried)
    assert len(rows) == 2 * (2 + len(tried)) and [row[3].strip() for row in rows].count("gate + mm") == 2
    assert all(float(row[4]) > 0 for row in rows), "a configuration failed"
    assert all(float(row[6]) < 1e-5 for row in rows), "a configuration's output differs (float32 here)"


def test_bench_rejects_unknown_names():
    bench = _load(ROOT / "bench" / "run.py")
    with pytest.raises(SystemExit, match="--ops"):
        bench.parse_args(["--ops", "linear,attention"])
    with pytest.raises(SystemExit, match="--providers"):
        bench.parse_args(["--providers", "dense,nope"])


def test_transformers_round_trip_gives_the_same_outputs():
    """A BERT built from a config: sparsify, train, finalize, save_pretrained, reload with plain
    transformers: the reloaded model computes what the finalized ticket computes."""
    pytest.importorskip("transformers")
    bert = _load(ROOT / "examples" / "huggingface_bert.py")
    result = bert.main(["--steps", "80"])
    assert 0.0 < result["remaining"] < 0.5
    torch.testing.assert_close(result["finalized"], result["ticket"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result["reloaded"], result["finalized"], rtol=0, atol=0)
