"""Property tests of the Triton kernels under the interpreter (issue 18), and the
regression cases found.

Every case goes through the public API with ``backend="triton"`` (the dispatcher and
the registered op included) on tiny random shapes, fp32 and fp16 (bf16 runs on GPU only:
tests/gpu/test_fidelity_gpu.py), and compares the output and every gradient with the
float64 reference. Hypothesis draws the shapes, layouts, views and epilogues; the
searches are bounded and derandomized (the interpreter runs a kernel at Python speed).
"""

from __future__ import annotations

import pytest
import torch

import gankernels
from gankernels.ops import reference as ref
from gankernels.testing import assert_close_rel

# ----------------------------------------------------------------------------------
# Regression cases (issue 18, item 7).


def test_bias_act_reads_a_strided_bias_through_its_stride():
    """``b = arange(6)[::2]`` is channels 0, 2, 4, not 0, 1, 2; and so is its gradient."""
    x = torch.zeros(1, 3, 2, 2, requires_grad=True)
    b = torch.arange(6.0)[::2].requires_grad_(True)
    y = gankernels.bias_act(x, b, backend="triton")
    assert torch.equal(y, torch.tensor([0.0, 2.0, 4.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    g = torch.arange(12.0).view(1, 3, 2, 2)
    y.backward(g)
    assert torch.equal(b.grad, g.sum((0, 2, 3)))
    # The same with an activation and a clamp, against the reference.
    x = torch.randn(2, 3, 4, 5)
    b = torch.randn(9)[1::3]
    y = gankernels.bias_act(x, b, "lrelu", 0.2, 1.4, 0.9, backend="triton")
    assert_close_rel(y, ref.bias_act(x.double(), b.double(), "lrelu", 0.2, 1.4, 0.9))


@pytest.mark.parametrize("shape,dim", [((0, 3), 1), ((4, 0), 1), ((0, 3, 2, 2), 1), ((2, 0, 3, 3), 1), ((5, 0), 0)])
def test_bias_act_with_an_empty_dimension(shape, dim):
    """An empty bias dimension raised ``ValueError: 0 is not in list``; an empty x
    gives an empty result and gradients of zeros, as stock does."""
    x = torch.randn(shape, requires_grad=True)
    b = torch.randn(shape[dim], requires_grad=True)
    y = gankernels.bias_act(x, b, "lrelu", dim=dim, backend="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and b.grad.shape == b.shape
    assert not b.grad.any()


def test_bias_act_keeps_a_strided_view_in_its_stride_order():
    """A non-dense channels_last view is copied densely in its own stride order (the
    layout an elementwise op gives it), not to NCHW."""
    from gankernels.triton.bias_act import bias_act_forward

    x = torch.randn(2, 6, 9, 10).contiguous(memory_format=torch.channels_last)[:, :, ::2]
    b = torch.randn(6)
    y = bias_act_forward(x, b, "relu", 0.2, 1.0, None, 1)
    assert y.stride() == torch.empty_like(x).stride()
    assert_close_rel(y, ref.bias_act(x.double(), b.double(), "relu"))
