"""The performance tools of issue 10 that run without a GPU: the kernel census's reading of ncu's
raw CSV (analysis/kernel_census.py) and the roofline of experiments/bench/bench_configs.py."""
import importlib.util
import subprocess
import sys

import pytest

from conftest import ANALYSIS, REPO

sys.path.insert(0, str(ANALYSIS))
import kernel_census  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_configs", REPO / "experiments" / "bench" / "bench_configs.py")
bench_configs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_configs)

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"gpu__time_duration.sum"\n')
UNITS = '"","","","","","","","nsecond"\n'


def _row(i, name, ns):
    return f'"{i}","1","moelab","h","{name}","1","7","{ns}"\n'


@pytest.fixture()
def ncu_csv(tmp_path):
    p = tmp_path / "A_ncu.csv"
    p.write_text(
        "==PROF== Connected to process 1\n"
        "run   backend dtype tokens fwd bwd adamw step tokens/s\n"
        "base  cuda    bf16  16384  9.0 15.0 2.0 26.500 618000  peak 4.84 GB  init 0.4 s\n"
        + HEADER + UNITS
        + _row(0, "void moelab::(anonymous namespace)::swiglu_fwd_vec_kernel<__nv_bfloat16>(const T1 *, T1 *, long, long)", "1,000,000")
        + _row(1, "nvjet_sm90_tst_128x128_64x6_2x1_v_badd_NTT", "3000000")
        + _row(2, "void moelab::(anonymous namespace)::adamw4_kernel<__nv_bfloat16, __nv_bfloat16>(float *)", "500000")
        + _row(3, "void moelab::(anonymous namespace)::mystery_kernel(int)", "500000")
        + _row(4, "nvjet_sm90_tst_128x128_64x6_2x1_v_badd_NTT", "3000000"))
    return p


def test_reads_only_kernel_rows(ncu_csv):
    rows = kernel_census.read_rows(str(ncu_csv))
    assert len(rows) == 5  # the units row and the program's own lines are not kernels
    assert rows[0][1] == 1e6  # thousands separators
    assert kernel_census.bench_step_ms(str(ncu_csv)) == 26.5


def test_families_and_names():
    assert kernel_census.short_name("void moelab::(anonymous namespace)::rope_kernel<float>(const float*, long)") == "rope_kernel"
    assert kernel_census.family("void moelab::x::rope_kernel<float>(int)") == "RoPE"
    assert kernel_census.family("sm90_xmma_gemm_bf16") == "expert/dense GEMMs (cuBLAS)"
    assert kernel_census.family("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_grouped>(P)") \
        == "expert/dense GEMMs (cuBLAS)"
    assert kernel_census.family("mystery_kernel") == "other"


def test_census_per_step(ncu_csv):
    total_us, total_n, table = kernel_census.census(kernel_census.read_rows(str(ncu_csv)), steps=2)
    assert total_us == pytest.approx(4000.0)  # 8 ms of kernels over 2 steps
    assert total_n == 2.5
    assert "| expert/dense GEMMs (cuBLAS) | 1.0 | 3000 | 75.0% |" in table
    assert "| other | 0.5 | 250 | 6.2% |" in table


def test_census_cli(ncu_csv, tmp_path):
    out = subprocess.run([sys.executable, str(ANALYSIS / "kernel_census.py"), str(ncu_csv), "--steps", "2",
                          "--bench", str(ncu_csv), "--name", "A"], capture_output=True, text=True, check=True)
    assert "busy 15% of the step" in out.stdout  # 4 ms of kernels in a 26.5 ms step
    empty = tmp_path / "empty.csv"
    empty.write_text("==PROF== nothing\n")
    bad = subprocess.run([sys.executable, str(ANALYSIS / "kernel_census.py"), str(empty)], capture_output=True, text=True)
    assert bad.returncode == 1 and "no kernel rows" in bad.stdout
    neg = subprocess.run([sys.executable, str(ANALYSIS / "kernel_census.py"), str(ncu_csv), "--steps", "0"],
                         capture_output=True, text=True)
    assert neg.returncode == 2 and "--steps" in neg.stderr


TORCH_PROFILE = """/opt/torch/compile_fx.py:322: UserWarning: TensorFloat32 tensor cores
profile: 461 kernels and 10.60 ms of kernel time per step (torch.profiler, 3 steps)
| family | kernels / step | GPU us / step | share |
|---|---|---|---|
| GEMMs | 146.0 | 2500 | 51.4% |
| fused elementwise (triton) | 161.0 | 400 | 28.3% |
| optimizer | 7.0 | 300 | 8.2% |
| attention | 16.0 | 100 | 6.7% |
| kernel | calls / step | us / step | us / call |
|---|---|---|---|
| `cutlass_grouped` | 8.0 | 1450 | 181.2 |
{"side": "torch-compile", "config": "A", "ms": 11.0}
"""


def test_reads_torch_profile(tmp_path):
    p = tmp_path / "torch_A.txt"
    p.write_text(TORCH_PROFILE)
    fams = kernel_census.read_torch_profile(str(p))
    # The family table only: the kernel table after it and the warnings before it are not families.
    assert fams == {"GEMMs": 2500.0, "fused elementwise (triton)": 400.0, "optimizer": 300.0, "attention": 100.0}


def test_against_torch_groups(ncu_csv):
    moelab = kernel_census.family_us(kernel_census.read_rows(str(ncu_csv)), steps=2)
    table = kernel_census.against_torch(moelab, {"GEMMs": 2500.0, "attention": 100.0, "optimizer": 300.0,
                                                 "fused elementwise (triton)": 400.0})
    assert "| GEMMs | 3000 | 2500 | +500 |" in table
    assert "| attention | 0 | 100 | -100 |" in table
    assert "| optimizer | 250 | 300 | -50 |" in table
    assert "| everything else | 750 | 400 | +350 |" in table  # SwiGLU 500 + other 250 against Triton
    assert "| all kernels | 4000 | 3300 | +700 |" in table


def test_census_cli_against_torch(ncu_csv, tmp_path):
    t = tmp_path / "torch_A.txt"
    t.write_text(TORCH_PROFILE)
    out = subprocess.run([sys.executable, str(ANALYSIS / "kernel_census.py"), str(ncu_csv), "--steps", "2",
                          "--torch", str(t)], capture_output=True, text=True, check=True)
    assert "Against torch.compile's kernels" in out.stdout and "| all kernels | 4000 | 3300 | +700 |" in out.stdout
    t.write_text("no profile here\n")
    bad = subprocess.run([sys.executable, str(ANALYSIS / "kernel_census.py"), str(ncu_csv), "--steps", "2",
                          "--torch", str(t)], capture_output=True, text=True)
    assert bad.returncode == 1 and "No family table" in bad.stdout


def test_rmsnorm_kernels_are_rmsnorm():
    assert kernel_census.family("void moelab::(anonymous namespace)::rms_bwd_dx_vec_kernel<bf16>(int)") == "RMSNorm"
    assert kernel_census.family("void moelab::(anonymous namespace)::rms_dw_partial_kernel<float>(int)") == "RMSNorm"


def test_roofline_by_hand():
    # Config A: 105.0M parameters; 0.190 GFLOP per token x 16384 tokens (the MFU formula).
    g, t_compute, gb, t_mem, floor, binds = bench_configs.roofline_row("A")
    total, active = bench_configs.param_counts(bench_configs.get_config("A"))
    flops = (6 * active + 12 * 4 * 512 * 512) * 16384
    assert g == pytest.approx(flops / 1e9)
    assert t_compute == pytest.approx(flops / 800e12 * 1e3)
    assert gb == pytest.approx(32 * total / 1e9)
    assert floor == pytest.approx(t_compute + 32 * total / 4.8e12 * 1e3)
    assert binds == "compute"
    table = bench_configs.roofline()
    assert table.count("\n| ") == 7  # header + 6 configs


def test_report_reads_moelab_peak_memory():
    line = "base                         cuda    bf16    16384     23.373     48.183     10.622     82.032       199726  peak 31.96 GB  init 5.13 s"
    assert bench_configs.parse_moelab_peak_gb("run backend ...\n" + line) == 31.96
    assert bench_configs.parse_moelab_bench(line) == (82.032, 199726.0)
    assert bench_configs.parse_moelab_peak_gb(line.replace("peak 31.96 GB  ", "")) is None
    assert bench_configs.parse_moelab_peak_gb("nothing here") is None


def test_init_kernels_are_not_a_steps(ncu_csv, tmp_path):
    """fill_normal runs once at the start (the weights drawn on the device): not divided over the steps."""
    p = tmp_path / "with_init.csv"
    p.write_text(ncu_csv.read_text()
                 + _row(5, "void moelab::(anonymous namespace)::fill_normal_kernel<float>(float *, long)", "2000000")
                 + _row(6, "void moelab::(anonymous namespace)::fill_normal_kernel<__nv_bfloat16>(T1 *, long)", "1000000"))
    steps, init = kernel_census.split_init(kernel_census.read_rows(str(p)))
    assert len(steps) == 5 and len(init) == 2
    plain_us, plain_n, _ = kernel_census.census(kernel_census.read_rows(str(ncu_csv)), steps=2)
    out = subprocess.run([sys.executable, str(ANALYSIS / "kernel_census.py"), str(p), "--steps", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{plain_n:.0f} kernels and {plain_us / 1e3:.2f} ms of kernel time per step" in out.stdout
    assert "2 weight-init kernels (fill_normal), 3.00 ms in all" in out.stdout
    assert "fill_normal_kernel" not in out.stdout.split("Left out")[1].split("\n", 1)[1]
    only = tmp_path / "only_init.csv"
    only.write_text(HEADER + UNITS + _row(0, "fill_normal_kernel", "5"))
    none = subprocess.run([sys.executable, str(ANALYSIS / "kernel_census.py"), str(only)], capture_output=True, text=True)
    assert none.returncode == 1 and "no kernel rows of a training step" in none.stdout


# ---- stall_reasons.py, on ncu's real output for the attention kernels (H200, tenth session) -----
import stall_reasons  # noqa: E402

DATA = ANALYSIS / "tests" / "ncu_samples"


def test_stall_reasons_reads_the_real_ncu_output():
    fwd = stall_reasons.parse((DATA / "ncu_stalls_fwd_h200.txt").read_text())
    bwd = stall_reasons.parse((DATA / "ncu_stalls_bwd_h200.txt").read_text())
    assert [k["name"] for k in fwd] == ["fwd_wg_kernel<128>"]
    assert [k["name"] for k in bwd] == ["bwd_wg_kernel<128>"]
    assert fwd[0]["grid"] == (32, 32, 1) and fwd[0]["block"] == (256, 1, 1)
    assert bwd[0]["grid"] == (32, 4, 1)
    m = fwd[0]["metrics"]
    assert m["smsp__inst_executed.sum"] == 189730048  # "189,730,048": thousands separators
    assert m["smsp__cycles_active.avg"] == pytest.approx(736264.20)
    assert m["smsp__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active"] == pytest.approx(37.96)
    # The program's own output (a markdown table, Catch's summary) is not taken for metrics.
    assert all(name.startswith("smsp__") for name in m)


def test_stall_shares_sum_to_one_and_rank_the_reasons():
    bwd = stall_reasons.parse((DATA / "ncu_stalls_bwd_h200.txt").read_text())[0]
    shares = stall_reasons.stall_shares(bwd["metrics"])
    assert sum(shares.values()) == pytest.approx(1.0)
    top3 = sorted(shares, key=shares.get, reverse=True)[:3]
    assert set(top3) == {"wait", "selected", "barrier"}  # the backward's three fifths
    assert shares["barrier"] == pytest.approx(306665.51 / sum(
        v for k, v in bwd["metrics"].items() if k.startswith("smsp__average_warp_latency_issue_stalled_")
        and k.endswith(".ratio")))
    # The other metric family (Warp State Statistics) is read the same way.
    other = {"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": 3.0,
             "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio": 1.0}
    assert stall_reasons.stall_shares(other) == {"barrier": 0.75, "wait": 0.25}
    assert stall_reasons.stall_shares({"smsp__inst_executed.sum": 5.0}) == {}


def test_stall_reasons_report_and_cli(tmp_path):
    fwd, bwd = DATA / "ncu_stalls_fwd_h200.txt", DATA / "ncu_stalls_bwd_h200.txt"
    res = subprocess.run([sys.executable, str(ANALYSIS / "stall_reasons.py"), str(fwd), str(bwd)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "| | fwd_wg_kernel<128> 32x32x1 | bwd_wg_kernel<128> 32x4x1 |"
    assert "| ALU pipe busy | 38.0% | 27.2% |" in lines
    assert "| stalled: barrier | 9.2% | 19.6% |" in lines
    # Nothing to read: a message and a failing status, not an empty table.
    empty = tmp_path / "empty.txt"
    empty.write_text("==PROF== No kernels were profiled.\n")
    res = subprocess.run([sys.executable, str(ANALYSIS / "stall_reasons.py"), str(empty)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no kernel with metrics" in res.stdout
    res = subprocess.run([sys.executable, str(ANALYSIS / "stall_reasons.py"), str(tmp_path / "missing.txt")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "cannot read" in res.stderr and "missing.txt" in res.stderr
