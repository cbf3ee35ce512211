"""The static bound set beside a GPU run's times (``python -m gankernels.bench.bound_vs_time``):
which rows pair up, the arithmetic of both sides, and the summary's table — on a made-up
run against the recorded triton 3.8 report (no GPU, no compile)."""

from __future__ import annotations

import json

import pytest

from gankernels.bench import bound_vs_time, report, static_report, summary

STATIC = static_report.default_out_dir().parent / "static-3.8.0" / "static.json"
COPY = 4.0e12  # the made-up run's measured copy rate, bytes/s


def _case(op: str, c: int, co: int, h: int, kernel_ms, dtype: str = "bf16", fmt: str = "channels_last", status: str = "ok"):
    return {
        "op": op, "shape": {"n": 64, "c": c, "h": h, "w": h, "co": co}, "dtype": dtype, "fmt": fmt, "mode": "fwd",
        "id": f"{op} {c}→{co}, {h}×{h}, N=64 {dtype} {fmt} fwd", "best_stock": "eager CL", "best_stock_ms": 1.0,
        "best_gankernels": "gk triton" if status == "ok" else None, "best_gankernels_ms": kernel_ms, "speedup": None,
        "floor_ms": None, "pct_floor_best_stock": None, "pct_floor_best_gankernels": None, "flops": 0.0, "bytes": 0.0,
        "contenders": {
            "kernel triton": {"contender": "kernel triton", "family": "gankernels-kernel", "status": status,
                              "ms": kernel_ms if status == "ok" else None, "reason": ""},
        },
    }  # fmt: skip


def _results(cases: list[dict]) -> dict:
    return {
        "schema": report.SCHEMA_VERSION,
        "env": {"gpu": "NVIDIA H200 (made up)", "torch": "2.11.0", "triton": "3.8.0"},
        "options": {},
        "ceilings": {"copy_bytes_per_s": COPY, "matmul_flops_per_s": 7e14},
        "cases": cases,
        "train_step": None,
    }


@pytest.fixture(scope="module")
def static():
    if not STATIC.exists():
        pytest.skip(f"no recorded report at {STATIC}")
    return static_report.load(STATIC)


def test_rows_pair_cases_with_the_report_and_do_the_arithmetic(static):
    peak = 2 * 2048 * 132 * 1.98e9
    conv_flops = 2.0 * 64 * 128 * 64 * 64 * 9 * 64  # conv3x3 64→128 at 64²
    up_flops = 2.0 * 64 * 64 * 64 * 64 * 4 * 128  # gen_block 128→64 at 32² in: 64² out, 4 taps per phase
    pool_bytes = 64 * 64 * 64 * 64 * 3 + 64 * 3 * 128 * 128 * 2 + (27 * 64 + 64) * 2  # value + int8 out, x, w, b
    cases = [
        _case("conv3x3", 64, 128, 64, 1e3 * conv_flops / (0.5 * peak)),  # half the tensor peak
        _case("gen_block", 128, 64, 32, 1e3 * up_flops / (0.25 * peak)),
        _case("disc_block", 3, 64, 128, 1e3 * pool_bytes / (0.3 * COPY)),  # 30 % of the copy rate
        _case("conv3x3", 64, 128, 64, 1.0, dtype="fp32"),  # no static row: skipped
        _case("conv3x3", 64, 128, 64, 1.0, fmt="nchw"),
        _case("disc_block", 64, 128, 64, None, status="n/a"),  # no kernel time: skipped
        _case("max_pool2d", 64, 64, 64, 1.0),
    ]
    found = {r.case: r for r in bound_vs_time.rows(_results(cases), static)}
    assert sorted(found) == sorted(c["id"] for c in cases[:3])
    conv, up, pool = (found[c["id"]] for c in cases[:3])
    pref = bound_vs_time.preferred_rows(static)

    srow = pref["forward conv3x3 64->128 @64"]
    assert conv.measure == "tensor peak" and conv.measured == pytest.approx(0.5)
    assert conv.bound == pytest.approx(min(1.0, 1 / srow["useful_issue_load"]))
    assert conv.cta_bound == pytest.approx(min(1.0, 1 / srow["cta_issue_load"]))
    assert conv.of_bound == pytest.approx(0.5 / conv.bound)
    assert conv.static_key == f"forward conv3x3 64->128 @64 {srow['config']}"

    assert up.measure == "tensor peak" and up.measured == pytest.approx(0.25)

    srow = pref["forward conv3x3_pool 3->64 @128"]
    assert static_report.forward_hbm_bytes("pool", 3, 64, 128, 64) == pool_bytes
    assert pool.measure == "copy bandwidth" and pool.measured == pytest.approx(0.3)
    assert pool.bound == pytest.approx(min(1.0, 1 / srow["memory_time_load"])) and pool.cta_bound is None


def test_markdown_and_cli(static, tmp_path, capsys):
    cases = [_case("conv3x3", 3, 64, 128, 0.5), _case("disc_block", 256, 512, 16, 0.2)]
    run = tmp_path / "targets"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_results(cases)))
    assert bound_vs_time.main([str(run), "--static", str(STATIC), "--out", str(tmp_path / "bound.md")]) == 0
    text = capsys.readouterr().out
    assert text == (tmp_path / "bound.md").read_text()
    assert "not a time" in text and "NVIDIA H200 (made up)" in text
    body = [ln for ln in text.splitlines() if ln.startswith("| conv3x3") or ln.startswith("| disc_block")]
    assert len(body) == 2 and "% of copy bandwidth" in body[0] and "% of tensor peak" in body[1]
    with pytest.raises(SystemExit, match="not found"):
        bound_vs_time.main([str(run), "--static", str(tmp_path / "missing.json")])


def test_summary_sets_the_bound_beside_the_run(static, tmp_path):
    run = tmp_path / "conv-fwd"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_results([_case("conv3x3", 128, 256, 32, 0.4)])))
    text = summary.render(tmp_path)
    assert "conv-fwd: Static bound beside the measured time" in text
    assert "| conv3x3 128→256, 32×32, N=64 bf16 channels_last fwd | forward conv3x3 128->256 @32" in text
    # A run on a triton with no recorded report: no table, no error.
    other = _results([_case("conv3x3", 128, 256, 32, 0.4)])
    other["env"]["triton"] = "0.0.0"
    (run / "results.json").write_text(json.dumps(other))
    assert "Static bound" not in summary.render(tmp_path)
