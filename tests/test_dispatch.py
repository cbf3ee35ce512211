"""The dispatcher: backend selection, BackendUnavailable with every reason, explain, logging.

Only the torch backend is real on CPU, so the dispatcher is exercised with a backend
registered from the test (under the name "cuda", restored afterwards)."""

import logging

import pytest
import torch

import gankernels
from gankernels.ops import dispatch
from gankernels.ops import reference as ref
from gankernels.ops.dispatch import OpImpl


@pytest.fixture
def fake_backend():
    """Register a 'cuda' implementation of bias_act that serves only float32 and counts
    its calls; it computes 2 * reference, so its results are recognisable."""
    calls = []
    saved = dispatch._REGISTRY["bias_act"].get("cuda")

    def supports(x, b, act, alpha, gain, clamp, dim):
        reasons = []
        if x.dtype != torch.float32:
            reasons.append(f"dtype {x.dtype} is not float32")
        if act == "silu":
            reasons.append("silu is not served")
        return reasons

    def forward(x, b, act, alpha, gain, clamp, dim):
        calls.append(act)
        return 2 * ref.bias_act(x, b, act, alpha, gain, clamp, dim)

    dispatch.register("bias_act", "cuda", OpImpl(forward=forward, supports=supports))
    yield calls
    if saved is None:
        dispatch.unregister("bias_act", "cuda")
    else:
        dispatch.register("bias_act", "cuda", saved)


def test_auto_uses_stock_when_nothing_is_measured_or_recorded(fake_backend):
    # CPU calls are never timed: with two candidates and nothing recorded, auto runs
    # stock PyTorch, which is never slower than itself.
    x = torch.randn(2, 3, 4, 4)
    y = gankernels.bias_act(x, act="relu")
    torch.testing.assert_close(y, torch.relu(x))
    assert fake_backend == []
    ex = gankernels.explain("bias_act", x, act="relu")
    assert ex.backend == "torch" and ex.candidates == ("cuda", "torch")
    assert "stock default" in ex.how


def test_auto_picks_the_faster_backend_by_measurement(fake_backend, fake_timer):
    fake_timer["cuda"] = 1.0  # the fake backend "runs" in 1 ms, stock in 2 ms
    fake_timer["torch"] = 2.0
    x = torch.randn(2, 3, 4, 4)
    y = gankernels.bias_act(x, act="relu")
    torch.testing.assert_close(y, 2 * torch.relu(x))
    ex = gankernels.explain("bias_act", x, act="relu")
    assert ex.backend == "cuda" and "measured" in ex.how and "cuda 1 ms" in ex.how


def test_auto_passes_over_a_backend_that_cannot_serve(fake_backend):
    x = torch.randn(2, 3, 4, 4)
    y = gankernels.bias_act(x, act="silu")
    torch.testing.assert_close(y, torch.nn.functional.silu(x))
    assert fake_backend == []
    ex = gankernels.explain("bias_act", x, act="silu")
    assert ex.backend == "torch"
    assert ex.rejected["cuda"] == ["silu is not served"]
    assert "silu is not served" in str(ex)


def test_named_backend_that_cannot_serve_raises_with_every_reason(fake_backend):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(gankernels.BackendUnavailable) as info:
        gankernels.bias_act(x, act="silu", backend="cuda")
    msg = str(info.value)
    assert "not float32" in msg and "silu is not served" in msg
    assert info.value.reasons == {"cuda": ["dtype torch.float64 is not float32", "silu is not served"]}
    assert fake_backend == []  # never fell back silently


def test_named_backend_without_implementation_raises():
    x = torch.randn(1, 2, 3, 3)
    w = torch.randn(2, 2, 3, 3)
    if "triton" in dispatch.registered_backends("conv3x3") and not dispatch.get_impl("conv3x3", "triton").supports(
        x=x, w=w, b=None, act="linear", alpha=0.2, gain=1.0, clamp=None
    ):
        pytest.skip("triton serves CPU tensors in this process")
    with pytest.raises(gankernels.BackendUnavailable, match="triton"):
        gankernels.conv3x3(x, w, backend="triton")


def test_use_backend_and_env_default(fake_backend):
    x = torch.randn(2, 3, 4, 4)
    with gankernels.use_backend("torch"):
        gankernels.bias_act(x, act="relu")
        assert fake_backend == []
        with gankernels.use_backend("cuda"):
            gankernels.bias_act(x, act="relu")
            assert fake_backend == ["relu"]
        # the per-call argument wins over the context
        gankernels.bias_act(x, act="relu", backend="cuda")
        assert fake_backend == ["relu", "relu"]
    gankernels.bias_act(x, act="relu")  # auto: stock, nothing measured on CPU
    assert fake_backend == ["relu", "relu"]


def test_unknown_backend_names_are_errors():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        gankernels.bias_act(x, backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        with gankernels.use_backend("cudnn"):
            pass


def test_env_variable_sets_the_default(tmp_path):
    import subprocess
    import sys

    code = "import gankernels; from gankernels.ops import dispatch; print(dispatch.default_backend())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={"GANKERNELS_BACKEND": "torch", "PATH": ""}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "torch", out.stderr
    upper = subprocess.run(
        [sys.executable, "-c", code], env={"GANKERNELS_BACKEND": " Torch ", "PATH": ""}, capture_output=True, text=True
    )
    assert upper.stdout.strip() == "torch", upper.stderr  # case and spaces do not matter
    # A bad value does not break the import (python -m gankernels.env reports it); the
    # first op call that would use it raises, naming the variable.
    call = code + "; import torch; gankernels.bias_act(torch.ones(2, 3))"
    bad = subprocess.run(
        [sys.executable, "-c", call], env={"GANKERNELS_BACKEND": "nope", "PATH": ""}, capture_output=True, text=True
    )
    assert "GANKERNELS_BACKEND: unknown backend 'nope'" in bad.stderr and bad.stdout.strip() == "nope"
    env = subprocess.run(
        [sys.executable, "-m", "gankernels.env"], env={"GANKERNELS_BACKEND": "nope", "PATH": ""}, capture_output=True, text=True
    )
    assert env.returncode == 0 and "PROBLEM: GANKERNELS_BACKEND" in env.stdout, env.stderr


def test_unknown_log_level_warns():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import gankernels"], env={"GANKERNELS_LOG": "loud", "PATH": ""}, capture_output=True, text=True
    )
    assert out.returncode == 0 and "GANKERNELS_LOG: unknown level 'loud'" in out.stderr


def test_debug_logging_once_per_op_and_shape(fake_backend, caplog):
    x = torch.randn(2, 3, 4, 4)
    old = dispatch.logger.level
    dispatch.logger.setLevel(logging.DEBUG)
    dispatch.clear_resolution_cache()
    try:
        with caplog.at_level(logging.DEBUG, logger="gankernels"):
            for _ in range(3):
                gankernels.bias_act(x, act="relu")
            gankernels.bias_act(torch.randn(1, 3, 2, 2), act="relu")
    finally:
        dispatch.logger.setLevel(old)
    lines = [r.getMessage() for r in caplog.records if r.name == "gankernels"]
    assert len(lines) == 2, lines
    assert "-> torch" in lines[0] and "stock default" in lines[0]


def test_explain_accepts_the_public_function_and_kwargs():
    x = torch.randn(1, 4, 6, 6)
    w = torch.randn(8, 4, 3, 3)
    ex = gankernels.explain(gankernels.conv3x3_pool, x, w, act="lrelu", backend="torch")
    assert ex.backend == "torch" and ex.op == "conv3x3_pool"
    with pytest.raises(ValueError, match="op: unknown op"):
        gankernels.explain("conv5x5", x)


@pytest.fixture
def backend_with_backward():
    """A 'cuda' upsample whose backward refuses fake tensors, as a raw kernel launch would."""
    from torch._subclasses.fake_tensor import FakeTensor

    saved = dispatch._REGISTRY["upsample_nearest2d"].get("cuda")
    calls = []

    def backward(grad, scale_factor):
        assert not isinstance(grad, FakeTensor), "a raw kernel cannot run on fake tensors"
        calls.append(scale_factor)
        return ref.upsample_nearest2d_backward(grad, scale_factor)

    impl = OpImpl(forward=lambda x, scale_factor: ref.upsample_nearest2d(x, scale_factor), backward=backward)
    dispatch.register("upsample_nearest2d", "cuda", impl)
    yield calls
    if saved is None:
        dispatch.unregister("upsample_nearest2d", "cuda")
    else:
        dispatch.register("upsample_nearest2d", "cuda", saved)


def test_fast_backward_runs_in_an_opaque_op_under_compile(backend_with_backward):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    f = lambda x: gankernels.upsample_nearest2d(x, 2, backend="cuda").square().sum()
    (g_eager,) = torch.autograd.grad(f(x), x)
    assert backend_with_backward == [2]
    (g_compiled,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), x)
    torch.testing.assert_close(g_compiled, g_eager)
    assert backend_with_backward == [2, 2]
    # building a graph of the backward (double backward) uses the reference formulas ...
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    assert backend_with_backward == [2, 2]
    # ... whose own first-order backward passes through the op again, fast
    g.sum().backward()
    assert backend_with_backward == [2, 2, 2]
    torch.testing.assert_close(x.grad, torch.full_like(x, 8.0))


def test_opcheck_backward_ops(backend_with_backward):
    grad = torch.randn(2, 3, 8, 10).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.gankernels.upsample_nearest2d_backward.default, (grad, 2, "cuda"))
