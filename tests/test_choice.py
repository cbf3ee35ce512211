"""auto's choice by measurement (gankernels.ops.choice), on CPU with a test backend and
an injected timer (the ``fake_timer`` fixture of conftest.py)."""

import json
import subprocess
import sys

import pytest
import torch

import gankernels
from gankernels.ops import choice, dispatch
from gankernels.ops import reference as ref
from gankernels.ops.dispatch import OpImpl


@pytest.fixture
def second_backend():
    """A 'cuda' bias_act on CPU tensors, computing the reference; counts its forwards."""
    calls = []
    saved = dispatch._REGISTRY["bias_act"].get("cuda")

    def forward(x, b, act, alpha, gain, clamp, dim):
        calls.append(tuple(x.shape))
        return ref.bias_act(x, b, act, alpha, gain, clamp, dim)

    dispatch.register("bias_act", "cuda", OpImpl(forward=forward))
    yield calls
    if saved is None:
        dispatch.unregister("bias_act", "cuda")
    else:
        dispatch.register("bias_act", "cuda", saved)


def test_first_call_times_each_candidate_once_then_keeps_the_fastest(second_backend, fake_timer):
    fake_timer.update(cuda=0.5, torch=1.0)
    x = torch.randn(2, 3, 4, 4)
    for _ in range(3):
        y = gankernels.bias_act(x, act="lrelu")
    torch.testing.assert_close(y, torch.nn.functional.leaky_relu(x, 0.2))
    assert sorted(fake_timer["_runs"]) == ["cuda", "torch"]  # timed once, on the first call
    assert second_backend == [(2, 3, 4, 4)] * 4  # 1 timed run + 3 calls
    ex = gankernels.explain("bias_act", x, act="lrelu")
    assert ex.backend == "cuda" and ex.how.startswith("cuda (measured: cuda 0.5 ms, torch 1 ms")
    # another signature is timed anew
    gankernels.bias_act(torch.randn(1, 3, 2, 2), act="lrelu")
    assert len(fake_timer["_runs"]) == 4


def test_a_slower_fast_backend_loses_to_stock_and_a_tie_goes_to_stock(second_backend, fake_timer):
    fake_timer.update(cuda=2.0, torch=1.0)
    gankernels.bias_act(torch.randn(2, 3), act="relu")
    assert gankernels.explain("bias_act", torch.randn(2, 3), act="relu").backend == "torch"
    fake_timer.update(cuda=1.0, torch=1.0)
    gankernels.bias_act(torch.randn(4, 3), act="relu")
    assert gankernels.explain("bias_act", torch.randn(4, 3), act="relu").backend == "torch"


def test_timing_covers_the_backward_when_gradients_are_needed(second_backend, fake_timer):
    fake_timer.update(cuda=0.5, torch=1.0)
    x = torch.randn(2, 3, requires_grad=True)
    gankernels.bias_act(x, act="tanh").sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)
    sigs = list(choice._memory)
    assert len(sigs) == 1 and sigs[0].startswith("bias_act|fwdbwd|")


def test_choices_persist_on_disk_for_later_processes(second_backend, fake_timer, tmp_path):
    fake_timer.update(cuda=0.5, torch=1.0)
    x = torch.randn(2, 3)
    gankernels.bias_act(x, act="relu")
    data = json.loads(choice.cache_file().read_text())
    assert list(data.values()) == [{"backend": "cuda", "times_ms": {"cuda": 0.5, "torch": 1.0}}]
    assert choice.cache_file().parent == tmp_path / "choices"
    # a fresh process (simulated: memory cleared) reads the file and times nothing
    choice.clear()
    runs_before = len(fake_timer["_runs"])
    gankernels.bias_act(x, act="relu")
    assert len(fake_timer["_runs"]) == runs_before
    assert gankernels.explain("bias_act", x, act="relu").how.startswith("cuda (cache")


def test_switch_turns_timing_off(second_backend, fake_timer, monkeypatch):
    monkeypatch.setenv(choice.ENV_AUTOTUNE, "0")
    fake_timer.update(cuda=0.5, torch=1.0)
    gankernels.bias_act(torch.randn(2, 3), act="relu")
    assert fake_timer["_runs"] == []
    ex = gankernels.explain("bias_act", torch.randn(2, 3), act="relu")
    assert ex.backend == "torch" and "GANKERNELS_AUTOTUNE=0" in ex.how


def test_without_timing_the_recorded_table_decides(second_backend, fake_timer, monkeypatch, tmp_path):
    monkeypatch.setenv(choice.ENV_AUTOTUNE, "0")
    x = torch.randn(2, 3, 4, 4)
    key = choice._recorded_key("bias_act", False, choice.describe({"x": x, "b": None}))
    assert key == "cpu|bias_act|fp32|nchw|fwd|2x3x4x4->3"
    table = tmp_path / "recorded.json"
    table.write_text(json.dumps({"choices": {key: "cuda"}}))
    monkeypatch.setattr(choice, "RECORDED_TABLE", table)
    choice.clear()
    gankernels.bias_act(x, act="relu")
    assert second_backend == [(2, 3, 4, 4)]
    assert gankernels.explain("bias_act", x, act="relu").backend == "cuda"
    # a shape not recorded: stock
    assert gankernels.explain("bias_act", torch.randn(2, 3, 4, 5), act="relu").backend == "torch"


def test_table_from_recorded_gpu_results(tmp_path):
    case = {
        "op": "conv3x3",
        "shape": {"n": 64, "c": 128, "h": 32, "w": 32, "co": 256},
        "dtype": "bf16",
        "fmt": "channels_last",
        "mode": "fwd",
        "best_stock_ms": 0.2,
        "contenders": {
            "eager CL": {"family": "stock", "status": "ok", "ms": 0.2},
            "gk triton": {"family": "gankernels", "status": "ok", "ms": 0.1},
            "gk cuda": {"family": "gankernels", "status": "n/a", "ms": None},
        },
    }
    slower = dict(case, op="max_pool2d", contenders={"gk triton": {"family": "gankernels", "status": "ok", "ms": 0.3}})
    (tmp_path / "h200-2026-12-01").mkdir()
    (tmp_path / "h200-2026-12-01" / "results.json").write_text(
        json.dumps({"env": {"device": "cuda", "gpu": "NVIDIA H200"}, "cases": [case, slower]})
    )
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "results.json").write_text(json.dumps({"env": {"device": "cpu", "gpu": None}, "cases": [case]}))
    table = choice.table_from_results(tmp_path)
    assert table == {
        "NVIDIA H200|conv3x3|bf16|channels_last|fwd|64x128x32x32->256": "triton",
        "NVIDIA H200|max_pool2d|bf16|channels_last|fwd|64x128x32x32->256": "torch",
    }
    out = tmp_path / "table.json"
    assert choice.main([str(tmp_path), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["choices"] == table


def test_the_shipped_table_is_generated_from_the_recorded_results():
    shipped = json.loads(choice.RECORDED_TABLE.read_text())
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    assert shipped["choices"] == choice.table_from_results(results), "run: python -m gankernels.ops.choice benchmarks/results"


def test_tune_fills_the_cache_ahead_of_time(second_backend, fake_timer):
    fake_timer.update(cuda=0.5, torch=1.0)
    model = gankernels.nn.BiasAct(3, act="lrelu")
    x = torch.randn(2, 3, 4, 4)
    before = [p.grad for p in model.parameters()]
    made = gankernels.tune(model, x)
    assert len(made) == 2 and {c.backend for c in made.values()} == {"cuda"}  # forward, forward + backward
    assert [p.grad for p in model.parameters()] == before
    runs = len(fake_timer["_runs"])
    model(x).sum().backward()
    assert len(fake_timer["_runs"]) == runs  # nothing left to time


def test_compile_takes_the_cached_choice_without_timing(second_backend, fake_timer):
    torch._dynamo.reset()
    fake_timer.update(cuda=0.5, torch=1.0)
    x = torch.randn(2, 3)
    gankernels.bias_act(x, act="relu")  # eager: measured, cuda
    runs = len(fake_timer["_runs"])
    calls = len(second_backend)
    f = torch.compile(lambda t: gankernels.bias_act(t, act="relu"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), torch.relu(x))
    assert len(fake_timer["_runs"]) == runs
    assert len(second_backend) > calls  # the compiled graph runs the cached choice
    # shapes may be symbolic while tracing: another shape of the same op and dtype
    # follows the eager choices; a dtype never run eagerly gets stock; nothing is timed
    torch._dynamo.reset()
    g = torch.compile(lambda t: gankernels.bias_act(t, act="relu"), fullgraph=True, backend="aot_eager", dynamic=True)
    calls = len(second_backend)
    g(torch.randn(5, 3))
    assert len(second_backend) == calls + 1
    g(torch.randn(5, 3, dtype=torch.float64))
    assert len(second_backend) == calls + 1
    assert len(fake_timer["_runs"]) == runs


def test_explain_never_times(second_backend, fake_timer):
    fake_timer.update(cuda=0.5, torch=1.0)
    ex = gankernels.explain("bias_act", torch.randn(2, 3), act="relu")
    assert ex.backend is None and "not measured yet" in ex.how
    assert fake_timer["_runs"] == []


def test_env_report_names_the_choice_cache():
    out = subprocess.run([sys.executable, "-m", "gankernels.env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "choices" in out.stdout and "auto -> torch" in out.stdout
