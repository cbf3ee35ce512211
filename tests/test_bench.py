"""The benchmark harness on CPU: a --quick run end to end, the FAIL path, the roofline
arithmetic (against ANCHORS.md's numbers), the transposed-convolution rewrite, the
targets and their verdicts, the named selections, and scripts/gpu_check.sh (its plan
and its CPU smoke path, the driver of the GPU run)."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gankernels.bench import cases as C
from gankernels.bench import runner
from gankernels.bench import targets as T
from gankernels.bench.cli import main
from gankernels.bench.readme import render
from gankernels.bench.report import load_results
from gankernels.bench.roofline import Ceilings, bytes_moved, floor_ms, flops, percent_of_floor
from gankernels.bench.selections import SELECTIONS
from gankernels.bench.timing import TimingConfig
from gankernels.ops import reference as ref
from gankernels.testing import assert_close_rel

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"

# ANCHORS.md's H200 ceilings: 4.25 TB/s copy, 692 TFLOP/s bf16 matmul.
H200 = Ceilings(copy_bytes_per_s=4.25e12, matmul_flops_per_s=692e12)
FAST_TIMING = TimingConfig(cpu_warmup=0, cpu_repeats=1, cpu_min_ms=0.0)
CPU_CEILINGS = Ceilings(copy_bytes_per_s=1e10, matmul_flops_per_s=1e11)


# ----------------------------------------------------------------------------------
# The transposed-convolution rewrite of the generator block.


@pytest.mark.parametrize("shape", [(2, 5, 7, 6, 4), (1, 3, 1, 1, 2), (3, 8, 4, 9, 16)])
def test_transposed_conv_equals_upsample_then_conv(shape):
    n, ci, h, w, co = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(co, generator=g, dtype=torch.float64)
    got = C.up_conv_transposed(x, wt, b)
    want = ref.up_conv3x3_naive(x, wt, b)
    assert got.shape == (n, co, 2 * h, 2 * w)
    assert_close_rel(got, want, tol=1e-10)


def test_transposed_conv_gradients_match():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(C.up_conv_transposed(x, wt, b), (x, wt, b), gout)
    want = torch.autograd.grad(ref.up_conv3x3_naive(x, wt, b), (x, wt, b), gout)
    for a, e, name in zip(got, want, ("x", "w", "b"), strict=True):
        assert_close_rel(a, e, tol=1e-10, what=f"grad_{name}")


def test_transposed_kernel_layout():
    # Per axis, taps (w0, w1, w2) = (1, 2, 3) -> summed shifts (1, 3, 5, 3) -> flipped (3, 5, 3, 1);
    # a separable 3×3 kernel gives the outer product, with in/out channels swapped.
    r = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    w = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    w[1, 0] = torch.outer(r, r)
    k = C.transposed_kernel(w)
    assert k.shape == (1, 2, 4, 4)
    kr = torch.tensor([3.0, 5.0, 3.0, 1.0], dtype=torch.float64)
    assert torch.equal(k[0, 1], torch.outer(kr, kr))
    assert torch.equal(k[0, 0], torch.zeros(4, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------------
# Roofline arithmetic.


def _case(op, n, c, h, w, co, dtype="bf16", mode="fwd"):
    return C.Case(op, C.Shape(n, c, h, w, co), dtype, "channels_last", mode)


def test_roofline_matches_anchors():
    gen = _case("gen_block", 64, 512, 8, 8, 256)
    assert flops(gen) == 2 * 64 * 256 * 16 * 16 * 9 * 512  # stock FLOPs at the upsampled resolution
    assert floor_ms(gen, H200) == pytest.approx(0.056, abs=5e-4)
    disc_small = _case("disc_block", 64, 3, 128, 128, 64)  # memory-bound row
    assert floor_ms(disc_small, H200) == pytest.approx(0.009, abs=5e-4)
    assert bytes_moved(disc_small) == 2 * (64 * 3 * 128 * 128 + 64 * 3 * 9 + 64 + 64 * 64 * 64 * 64)
    disc = _case("disc_block", 64, 64, 64, 64, 128)
    assert floor_ms(disc, H200) == pytest.approx(0.056, abs=5e-4)
    # Stand-alone ops: ANCHORS quotes % of copy bandwidth for its measured times.
    pool = _case("max_pool2d", 64, 128, 64, 64, 128)
    assert percent_of_floor(floor_ms(pool, H200), 0.095) == pytest.approx(21, abs=0.5)
    up = _case("upsample_nearest2d", 64, 128, 64, 64, 128)
    assert percent_of_floor(floor_ms(up, H200), 0.804) == pytest.approx(10, abs=0.5)
    ba = _case("bias_act", 64, 128, 64, 64, 128)
    assert percent_of_floor(floor_ms(ba, H200), 0.118) == pytest.approx(27, abs=0.5)


def test_roofline_fwdbwd_and_dtype():
    fwd = _case("conv3x3", 4, 8, 16, 16, 8, dtype="fp32")
    bwd = _case("conv3x3", 4, 8, 16, 16, 8, dtype="fp32", mode="fwdbwd")
    assert flops(bwd) == 3 * flops(fwd)
    x, w, b, y = 4 * 8 * 256, 8 * 8 * 9, 8, 4 * 8 * 256
    assert bytes_moved(fwd) == 4 * (x + w + b + y)
    assert bytes_moved(bwd) == 4 * (x + w + b + y + (y + y + x + w) + (x + w + b))
    assert bytes_moved(_case("conv3x3", 4, 8, 16, 16, 8, dtype="bf16")) == bytes_moved(fwd) / 2
    pool_bwd = _case("max_pool2d", 2, 4, 8, 8, 4, dtype="fp32", mode="fwdbwd")
    x, y = 2 * 4 * 64, 2 * 4 * 16
    assert bytes_moved(pool_bwd) == 4 * ((x + y) + (y + y + x))


# ----------------------------------------------------------------------------------
# Cases and shapes.


def test_parse_shape():
    assert C.parse_shape("2,3,8,8") == C.Shape(2, 3, 8, 8, 3)
    assert C.parse_shape("2,3,8,8:16") == C.Shape(2, 3, 8, 8, 16)
    for bad in ("2,3,8", "2,3,8,8:", "a,b,c,d", "0,3,8,8"):
        with pytest.raises(ValueError, match="--shapes"):
            C.parse_shape(bad)


def test_build_cases_rejects_unknown_op():
    with pytest.raises(ValueError, match="--ops"):
        C.build_cases(["conv5x5"], ["fp32"], ["channels_last"], ["fwd"], "cpu", True)


def test_every_contender_passes_reference_check_on_cpu():
    """Stock, the rewrite and the torch backend are all correct: none may FAIL."""
    for op in ("gen_block", "disc_block", "bias_act", "upsample_nearest2d"):
        case = _case(op, 2, 4, 6, 6, 8, dtype="fp32", mode="fwdbwd")
        s = runner.run_case(case, "cpu", runner.contenders_for(case, compile=False), FAST_TIMING, CPU_CEILINGS)
        statuses = {r.contender: r.status for r in s.records}
        assert statuses["eager NCHW"] == statuses["eager CL"] == statuses["gk torch"] == "ok", statuses
        assert statuses["compile"] == "n/a"
        if op == "gen_block":
            assert statuses["convT eager"] == "ok"
        assert s.best_stock is not None and s.best_gk is not None and s.speedup > 0


def test_bf16_pool_gradient_accepts_rounded_argmax():
    """In bf16, stock rounds before pooling: its gradient matches the rounded-argmax
    float64 reference (not the exact one), and must not be reported FAIL."""
    case = _case("disc_block", 2, 16, 12, 12, 32, dtype="bf16", mode="fwdbwd")
    s = runner.run_case(case, "cpu", runner.contenders_for(case, compile=False)[:2], FAST_TIMING, CPU_CEILINGS)
    for r in s.records:
        assert r.status == "ok", (r.contender, r.reason)
        assert r.reference == "exact" or r.reference.startswith("argmax after rounding at")


def test_unavailable_backend_is_listed_with_reason():
    case = _case("conv3x3", 1, 4, 6, 6, 4, dtype="fp32")
    s = runner.run_case(case, "cpu", runner.contenders_for(case, compile=False), FAST_TIMING, CPU_CEILINGS)
    tri = next(r for r in s.records if r.contender == "gk triton")
    assert tri.status == "n/a" and "cpu" in tri.reason and tri.ms is None


# ----------------------------------------------------------------------------------
# The FAIL path: a wrong (fast) contender is reported, never timed as a win.


_REAL_CONTENDERS = runner.contenders_for


def _with_wrong_contender(case, compile=True, compile_skip="", kernel_only=False):
    def make(case, tensors):
        stock = C.STOCK[case.op]
        return lambda **t: stock(**t) * 1.01  # 1 % off: far outside fp32's 1e-5

    return _REAL_CONTENDERS(case, compile, compile_skip, kernel_only) + [runner.Contender("gk wrong", runner.GK_FAMILY, make)]


def test_wrong_contender_is_reported_fail(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runner, "contenders_for", _with_wrong_contender)
    rc = main(
        [
            "--device",
            "cpu",
            "--quick",
            "--ops",
            "max_pool2d",
            "--modes",
            "fwd",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--no-plots",
        ]
    )
    assert rc == 0
    data = load_results(tmp_path)
    (case,) = data["cases"]
    wrong = case["contenders"]["gk wrong"]
    assert wrong["status"] == "FAIL" and wrong["ms"] is None and wrong["rel_l2_err"] > 1e-3
    assert "relative L2 error" in wrong["reason"]
    assert case["best_gankernels"] == "gk torch"
    out = capsys.readouterr().out
    assert "| FAIL |" in out and "gk wrong: FAIL" in out


# ----------------------------------------------------------------------------------
# The CLI end to end on CPU.


def test_quick_cpu_run_writes_every_output(tmp_path, capsys):
    rc = main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "headline numbers need a CUDA GPU" in out
    assert "| case | floor ms |" in out

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["env"]["device"] == "cpu" and data["env"]["torch"] == torch.__version__
    assert data["env"]["command"].startswith("python -m gankernels.bench --quick --device cpu")
    assert {c["op"] for c in data["cases"]} == set(C.OPS)
    assert {c["mode"] for c in data["cases"]} == {"fwd", "fwdbwd"}
    for c in data["cases"]:
        assert c["floor_ms"] > 0
        assert c["contenders"]["eager CL"]["status"] == "ok", c["id"]
        assert c["contenders"]["gk torch"]["status"] == "ok", c["id"]
        assert c["best_stock_ms"] > 0 and c["speedup"] > 0
        for r in c["contenders"].values():
            assert r["status"] in ("ok", "FAIL", "n/a", "error")
            assert (r["ms"] is not None) == (r["status"] == "ok")
            if r["status"] != "ok":
                assert r["reason"], (c["id"], r)

    ts = data["train_step"]
    variants = {v["name"]: v for v in ts["variants"]}
    assert variants["stock eager"]["status"] == "ok" and variants["stock eager"]["step_ms"] > 0
    assert variants["stock compile"]["status"] == "n/a"
    gk = variants["gankernels eager"]
    if gk["status"] == "ok":  # convert exists: losses must agree tightly in fp32
        assert gk["max_loss_rel_diff"] <= 1e-4
    else:
        assert gk["status"] == "n/a" and "convert" in gk["reason"]

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(c["contenders"]) for c in data["cases"]) + len(ts["variants"])
    assert {r["status"] for r in rows} <= {"ok", "FAIL", "n/a", "error"}
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# gankernels benchmark") and "| case |" in md
    assert "Targets (ANCHORS.md):" in md and "| fp32 (TF32) blocks | gen_block" in md
    assert "Memory-bound ops" in md and "| max_pool2d 4×32×32×32 fp32 CL fwd | 0.66 | gk torch |" in md
    assert "Backend torch:" in md
    for png in ("speedup.png", "roofline.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    section = render(data, "results.json")
    assert section.startswith("<!-- performance") and "## Performance" in section and "CUDA GPU" in section
    assert data["env"]["command"] in section


def test_compiled_contender_runs_on_cpu():
    """torch.compile of the stock code is checked and timed like any other contender."""
    case = _case("upsample_nearest2d", 1, 2, 4, 4, 2, dtype="fp32")
    cs = [c for c in runner.contenders_for(case, compile=True) if c.name == "compile"]
    s = runner.run_case(case, "cpu", cs, FAST_TIMING, CPU_CEILINGS)
    (rec,) = s.records
    assert rec.status == "ok", rec.reason


def test_bad_shape_is_a_clear_error():
    with pytest.raises(SystemExit, match="--shapes"):
        main(["--shapes", "1,2,3", "--no-progress"])


def test_wrong_stock_helper_is_caught():
    # Sanity of the check itself: the reference differs from a visibly wrong function.
    case = _case("max_pool2d", 1, 2, 4, 4, 2, dtype="fp32")
    wrong = runner.Contender("avg", runner.STOCK_FAMILY, lambda case, t: lambda x: F.avg_pool2d(x, 2))
    s = runner.run_case(case, "cpu", [wrong], FAST_TIMING, CPU_CEILINGS)
    assert s.records[0].status == "FAIL" and s.best_stock is None and s.speedup is None


def test_budget_skips_compile_visibly_and_backends_filter():
    cases = [_case("max_pool2d", 1, 2, 4, 4, 2, dtype="fp32")]
    (s,) = runner.run_cases(
        cases, "cpu", FAST_TIMING, CPU_CEILINGS, compile=True, backends=["torch"], show_progress=False, budget_s=0.0
    )
    by = {r.contender: r for r in s.records}
    assert by["compile"].status == "n/a" and "--budget-s" in by["compile"].reason
    assert "gk triton" not in by and "gk cuda" not in by and by["gk torch"].status == "ok"


def test_kink_side_is_forgiven_but_not_a_wrong_backward():
    """fp16: the transposed-conv rewrite rounds its summed kernel, which moves a few
    near-zero pre-activations across the leaky ReLU's kink; it must pass. A contender
    with the right forward but the wrong slope in its backward must still FAIL."""
    case = _case("gen_block", 2, 16, 16, 16, 8, dtype="fp16", mode="fwdbwd")

    def wrong_backward(x, w, b):
        p = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
        y, y_bad = F.leaky_relu(p, C.ALPHA), F.leaky_relu(p, 0.5)
        return y_bad + (y - y_bad).detach()  # forward: slope 0.2; backward: slope 0.5

    cs = [c for c in runner.contenders_for(case, compile=False) if c.name == "convT eager"]
    cs.append(runner.Contender("wrong bwd", runner.GK_FAMILY, lambda case, t: wrong_backward))
    s = runner.run_case(case, "cpu", cs, FAST_TIMING, CPU_CEILINGS)
    convt, wrong = s.records
    assert convt.status == "ok", convt.reason
    assert wrong.status == "FAIL" and "grad_" in wrong.reason


@pytest.mark.gpu
def test_quick_gpu_run(tmp_path):
    """The CUDA path of the harness (ceilings, do_bench, the float64 reference on the GPU):
    one generator and one discriminator row, bf16, without compile to stay short."""
    rc = main(
        ["--device", "cuda", "--quick", "--ops", "gen_block", "disc_block", "--modes", "fwd", "fwdbwd", "--shapes", "8,64,16,16:32"]
        + ["--no-compile", "--out", str(tmp_path), "--no-progress", "--no-plots"]
    )
    assert rc == 0
    data = load_results(tmp_path)
    assert data["env"]["gpu"] and data["ceilings"]["copy_bytes_per_s"] > 1e11 and data["ceilings"]["matmul_flops_per_s"] > 1e13
    for c in data["cases"]:
        for name in ("eager NCHW", "eager CL", "convT eager", "gk torch"):
            if name in c["contenders"]:
                assert c["contenders"][name]["status"] == "ok", (c["id"], name, c["contenders"][name])
        for r in c["contenders"].values():
            assert r["status"] != "error", (c["id"], r)


# ----------------------------------------------------------------------------------
# The backward alone (``bwd``) and the kernel-only call.


def test_roofline_bwd_is_the_backward_part():
    for op in ("conv3x3", "gen_block", "max_pool2d", "upsample_nearest2d", "bias_act"):
        fwd, both, bwd = (_case(op, 2, 4, 8, 8, 6, dtype="fp32", mode=m) for m in ("fwd", "fwdbwd", "bwd"))
        assert bytes_moved(bwd) == bytes_moved(both) - bytes_moved(fwd), op
        assert flops(bwd) == 2 * flops(fwd), op


def test_bwd_mode_times_only_the_backward():
    """In bwd the forward runs once, before timing; each run() is a backward on the
    kept graph, and its gradients pass the float64 check."""
    case = _case("gen_block", 2, 4, 5, 5, 3, dtype="fp32", mode="bwd")
    calls = []

    def make(case, tensors):
        def fn(**t):
            calls.append(1)
            return C.STOCK[case.op](**t)

        return fn

    ctx = runner.CaseContext(case, "cpu", seed=0)
    rec, run = runner.prepare(ctx, runner.Contender("counting", runner.STOCK_FAMILY, make), "cpu")
    assert rec.status == "ok", rec.reason
    before = len(calls)
    for _ in range(3):
        out, gx, gw, gb = run()
    assert len(calls) == before == 1
    assert gx.shape == (2, 4, 5, 5) and gw.shape == (3, 4, 3, 3) and gb.shape == (3,)


def test_bwd_mode_checks_every_contender_on_cpu():
    for op in ("max_pool2d", "upsample_nearest2d", "disc_block"):
        case = _case(op, 2, 4, 6, 6, 8, dtype="fp32", mode="bwd")
        s = runner.run_case(case, "cpu", runner.contenders_for(case, compile=False), FAST_TIMING, CPU_CEILINGS)
        statuses = {r.contender: r.status for r in s.records}
        assert statuses["eager NCHW"] == statuses["eager CL"] == statuses["gk torch"] == "ok", (op, statuses)


@pytest.mark.parametrize("op", ["disc_block", "gen_block", "to_rgb", "max_pool2d", "upsample_nearest2d", "bias_act"])
def test_kernel_call_matches_the_reference(op):
    """The kernel-only call normalises its arguments as the public op does: the torch
    backend's registered forward, called directly, equals the float64 reference."""
    case = _case(op, 2, 4, 6, 6, 3, dtype="fp32")
    tensors = C.make_inputs(case, "cpu", seed=3)
    out = C.kernel_call(op, "torch", tensors)(**tensors)
    want = C.REFERENCE[op](**{k: v.double() for k, v in tensors.items()})
    assert_close_rel(out, want, tol=1e-5)


def test_kernel_only_contenders_are_forward_only_and_never_the_best():
    fwd = _case("disc_block", 1, 4, 6, 6, 4, dtype="fp32")
    names = [c.name for c in runner.contenders_for(fwd, compile=False, kernel_only=True)]
    assert names[-2:] == ["kernel triton", "kernel cuda"]
    both = _case("disc_block", 1, 4, 6, 6, 4, dtype="fp32", mode="fwdbwd")
    assert not any(c.family == runner.KERNEL_FAMILY for c in runner.contenders_for(both, compile=False, kernel_only=True))
    s = runner.CaseSummary(fwd, 1.0)
    s.records = [
        runner.Record(fwd, "gk torch", runner.GK_FAMILY, "ok", ms=2.0),
        runner.Record(fwd, "kernel triton", runner.KERNEL_FAMILY, "ok", ms=0.5),
        runner.Record(fwd, "eager CL", runner.STOCK_FAMILY, "ok", ms=1.0),
    ]
    assert s.best_gk.contender == "gk torch" and s.speedup == 0.5


# ----------------------------------------------------------------------------------
# Targets (ANCHORS.md) and their verdicts.


def _target(op, c, co, dtype="bf16", mode="fwd"):
    return T.target_for(op, C.Shape(64, c, 64, 64, co), dtype, mode)


def test_targets_are_the_anchors_table():
    assert _target("gen_block", 512, 256).bound == 2.0
    assert _target("gen_block", 64, 32, mode="fwdbwd").bound == 2.0
    rgb = _target("disc_block", 3, 64)
    assert rgb.bound == 5.0 and rgb.baseline is T.ALL_STOCK
    assert _target("disc_block", 64, 128, mode="fwdbwd").bound == 1.5
    conv = _target("conv3x3", 128, 256)
    assert conv.bound == 1.2 and conv.baseline == ("eager NCHW", "eager CL")
    assert _target("gen_block", 128, 64, dtype="fp32").bound == 1.5
    assert _target("max_pool2d", 128, 128, mode="bwd").kind == T.COPY_BANDWIDTH
    assert _target("upsample_nearest2d", 128, 128).bound == 80.0
    assert _target("bias_act", 128, 128) is None  # ANCHORS sets no target for it
    assert _target("conv3x3", 128, 256, dtype="fp32") is None
    assert _target("max_pool2d", 128, 128, mode="fwdbwd") is None  # ANCHORS: fwd and bwd, each


def _rec(name, family, ms, status="ok"):
    return {"contender": name, "family": family, "status": status, "ms": ms if status == "ok" else None}


def _case_dict(op, c, co, recs, dtype="bf16", mode="fwd", floor=0.01):
    return {
        "id": f"{op} {c}→{co}", "op": op, "shape": {"n": 64, "c": c, "h": 128, "w": 128, "co": co}, "dtype": dtype,
        "mode": mode, "floor_ms": floor, "contenders": {r["contender"]: r for r in recs},
    }  # fmt: skip


def test_rgb_row_compares_with_compile_not_eager():
    """The 3→64 row: 0.1 ms is 8× eager but only 4× torch.compile — missed."""
    recs = [
        _rec("eager NCHW", "stock", 0.9),
        _rec("eager CL", "stock", 0.8),
        _rec("compile", "stock", 0.4),
        _rec("gk cuda", "gankernels", 0.1),
        _rec("kernel cuda", "kernel", 0.01),
    ]
    v = T.case_verdict(_case_dict("disc_block", 3, 64, recs))
    assert v.target.name == "discriminator 3→64 row" and v.against == "compile"
    assert v.value == pytest.approx(4.0) and v.status == T.MISSED
    recs[2] = _rec("compile", "stock", None, status="n/a")
    v = T.case_verdict(_case_dict("disc_block", 3, 64, recs))
    assert v.status == T.INCOMPLETE and "compile: n/a" in v.note  # never "met" against eager alone


def test_conv3x3_target_is_against_eager_only_and_copy_bandwidth_verdict():
    recs = [_rec("eager NCHW", "stock", 1.3), _rec("eager CL", "stock", 1.2), _rec("compile", "stock", 0.5)]
    v = T.case_verdict(_case_dict("conv3x3", 64, 128, recs + [_rec("gk triton", "gankernels", 1.0)]))
    assert v.against == "eager CL" and v.value == pytest.approx(1.2) and v.status == T.MET
    pool = [_rec("eager CL", "stock", 0.2), _rec("gk triton", "gankernels", 0.1)]
    assert T.case_verdict(_case_dict("max_pool2d", 128, 128, pool, floor=0.08)).status == T.MET  # 80 %
    v = T.case_verdict(_case_dict("max_pool2d", 128, 128, pool, mode="bwd", floor=0.079))
    assert v.status == T.MISSED and v.value == pytest.approx(79.0)
    none = T.case_verdict(
        _case_dict("gen_block", 64, 32, [_rec("eager CL", "stock", 1.0), _rec("gk triton", "gankernels", 1, "FAIL")])
    )
    assert none.status == T.NO_RESULT


def test_train_step_verdicts():
    def variant(name, ms, mem, status="ok"):
        return {"name": name, "status": status, "step_ms": ms, "peak_mem_mib": mem}

    ts = {
        "config": {"description": "batch 128"},
        "variants": [
            variant("stock eager", 9.4, 1000.0),
            variant("stock compile", 14.4, 900.0),
            variant("gankernels eager", 4.6, 650.0),
            variant("gankernels compile", None, None, "error"),
        ],
    }
    speed, memory = T.train_verdicts(ts)
    assert speed.status == T.MET and speed.value == pytest.approx(9.4 / 4.6) and speed.against == "stock eager"
    assert memory.status == T.MET and memory.value == pytest.approx(0.65)
    # A CUDA graph cannot exist on a CPU: no missing stock contender there.
    from gankernels.bench.training_step import NO_CUDA_GRAPHS

    ts["variants"].append({**variant("stock CUDA graph", None, None, "n/a"), "reason": NO_CUDA_GRAPHS})
    assert T.train_verdicts(ts)[0].status == T.MET
    # A faster stock formulation that ran is what gankernels is held against.
    ts["variants"][-1] = variant("stock CUDA graph", 4.0, 1000.0)
    speed = T.train_verdicts(ts)[0]
    assert speed.status == T.MISSED and speed.against == "stock CUDA graph"
    ts["variants"][1] = variant("stock compile", None, None, "n/a")
    assert T.train_verdicts(ts)[0].status == T.INCOMPLETE


# ----------------------------------------------------------------------------------
# Named selections.


def test_targets_selection_covers_every_target_on_the_gpu_shapes():
    cases = SELECTIONS["targets"].cases("cuda", quick=False)
    hit = {T.target_for(c.op, c.shape, c.dtype, c.mode) for c in cases} - {None}
    assert hit == set(T.TARGETS)
    assert any(c.op == "disc_block" and c.shape.c == 3 and c.shape.co == 64 for c in cases)
    assert len(cases) == len(set(cases))
    assert cases[0].mode == "fwd" and cases[0].dtype == "bf16"  # the most telling rows first


def test_cuda_selection_holds_the_extension_rows():
    cases = SELECTIONS["cuda"].cases("cuda", quick=False)
    assert {(c.op, c.shape.c, c.shape.co) for c in cases if c.op in C.CONV_OPS} == {
        ("disc_block", 3, 64),
        ("conv3x3", 3, 64),
        ("to_rgb", 32, 3),
    }
    assert SELECTIONS["cuda"].backends == ("cuda", "triton")
    assert {c.mode for c in cases if c.op == "max_pool2d"} == {"fwd", "bwd"}


def test_every_selection_runs_on_cpu_shapes():
    for name, sel in SELECTIONS.items():
        cases = sel.cases("cpu", quick=True)
        assert all(c.dtype == "fp32" for c in cases), name
        assert cases or sel.train_step, name


def test_select_rejects_explicit_case_options():
    with pytest.raises(SystemExit, match="--select memops: chooses the cases itself; drop --ops"):
        main(["--select", "memops", "--ops", "bias_act", "--no-progress"])


# ----------------------------------------------------------------------------------
# scripts/gpu_check.sh: the driver of the GPU run.


def _gpu_check(*args, env=None, timeout=60):
    return subprocess.run(
        ["bash", str(GPU_CHECK), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_gpu_check_plan_fits_its_budget():
    out = _gpu_check("--dry-run", env={"GPU_CHECK_BUDGET_S": "400"})
    assert out.returncode == 0, out.stderr
    planned = [line for line in out.stdout.splitlines() if line.startswith("== ")]
    assert planned[0] == "== build (150 s at most): bash -c build_extension"
    assert planned[1].startswith("== tests") and "-m pytest -q -m gpu tests" in planned[1]
    caps = [int(line.split("(")[1].split(" s at most")[0]) for line in planned if "s at most" in line]
    assert sum(caps) <= 400 - 20  # the summary keeps its 20 s
    assert "--select targets" in out.stdout and "--budget-s" in out.stdout and "--stop-s" in out.stdout
    assert "== train: skipped" in out.stdout  # what does not fit is listed, not dropped


def test_gpu_check_rejects_an_unknown_stage():
    out = _gpu_check("build", "timings")
    assert out.returncode == 2 and "unknown stage 'timings'" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path; on a GPU the script runs for real")
def test_gpu_check_smoke_path_reaches_its_summary(tmp_path):
    """The CPU smoke path end to end: build (no extension), one selection on CPU, the
    summary last, exit 0 — what catches a broken driver before a GPU run."""
    env = {"PYTHON": sys.executable, "OUT": str(tmp_path), "GANKERNELS_BUILD_CUDA": "0"}
    out = _gpu_check("build", "memops", env=env, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "smoke path" in text and text.index("== build") < text.index("== memops") < text.index("== summary")
    stages = (tmp_path / "stages.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in stages] == [["build", "ok"], ["memops", "ok"]]
    data = load_results(tmp_path / "memops")
    assert data["options"]["select"] == "memops" and {c["mode"] for c in data["cases"]} == {"fwd", "bwd"}
    summary = (tmp_path / "summary.md").read_text()
    assert "ANCHORS targets:" in summary and "| memops | max_pool2d" in summary
    assert text.rstrip().endswith("| memops | ok | " + stages[1].split("\t")[2] + " | memops.log |")


def test_no_timing_code_outside_the_bench_package():
    """Kernel timing lives in gankernels/bench only (the pytest-benchmark suites under
    benchmarks/ reuse its cases and checks); scripts/ holds the driver alone."""
    assert sorted(p.name for p in (ROOT / "scripts").iterdir()) == ["gpu_check.sh"]
    for path in [*ROOT.glob("gankernels/**/*.py"), *ROOT.glob("examples/**/*.py"), *ROOT.glob("benchmarks/**/*.py")]:
        if path.relative_to(ROOT).parts[:2] == ("gankernels", "bench"):
            continue
        if path.relative_to(ROOT).as_posix() == "gankernels/ops/choice.py":
            continue  # auto's choice by measurement at run time (one candidate vs another), not a benchmark
        text = path.read_text()
        assert "do_bench" not in text and "cuda.Event(" not in text, path


def test_readme_section_is_replaced_between_its_markers(tmp_path):
    from gankernels.bench.readme import BEGIN, END, replace_section

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{BEGIN}\nold numbers\n{END}\n\n## next\n")
    replace_section(readme, f"{BEGIN}\nnew numbers\n{END}")
    assert readme.read_text() == f"# title\n\nintro\n\n{BEGIN}\nnew numbers\n{END}\n\n## next\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="--readme"):
        replace_section(readme, "x")


def test_readme_static_bound_section_is_the_recorded_report():
    """The README's static-bound table is rendered from the recorded triton 3.8 report:
    regenerate it (python -m gankernels.bench.readme --static ... --readme README.md)
    whenever the report is recorded again; every forward kernel appears, labelled a bound."""
    from gankernels.bench.readme import STATIC_BEGIN, STATIC_END, _load_static, render_static

    report, source = _load_static(str(ROOT / "benchmarks" / "results" / "static-3.8.0"))
    section = render_static(report, pathlib.Path(source).relative_to(ROOT).as_posix())
    text = (ROOT / "README.md").read_text()
    assert text[text.index(STATIC_BEGIN) : text.index(STATIC_END) + len(STATIC_END)] == section
    assert "not a time" in section
    forward = [r for r in report["rows"] if r["kernel"] == "forward" and r.get("preferred", True)]
    assert len(forward) >= 12 and all(f"| {r['op']} | {r['shape']} |" in section for r in forward)
