"""Bad input gets a clear error naming the argument, never a crash or a wrong result."""

import pytest
import torch

import gankernels

CONV_OPS = [gankernels.conv3x3, gankernels.conv3x3_pool, gankernels.up_conv3x3]


def _conv_args():
    return torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3), torch.randn(8)


@pytest.mark.parametrize("op", CONV_OPS)
def test_wrong_ndim(op):
    x, w, b = _conv_args()
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor"):
        op(x[0], w, b)
    with pytest.raises(ValueError, match=r"w: expected a 4-D tensor"):
        op(x, w[0], b)
    with pytest.raises(ValueError, match=r"b: expected a 1-D tensor"):
        op(x, w, b[None])


@pytest.mark.parametrize("op", CONV_OPS)
def test_channel_mismatch(op):
    x, w, b = _conv_args()
    with pytest.raises(ValueError, match=r"w: has 4 input channels .* x has 3"):
        op(x[:, :3], w, b)


@pytest.mark.parametrize("op", CONV_OPS)
def test_weight_not_3x3(op):
    x, _, b = _conv_args()
    with pytest.raises(ValueError, match=r"w: expected a 3×3 kernel"):
        op(x, torch.randn(8, 4, 5, 5), b)


@pytest.mark.parametrize("op", CONV_OPS)
def test_bias_wrong_length(op):
    x, w, _ = _conv_args()
    with pytest.raises(ValueError, match=r"b: expected length 8"):
        op(x, w, torch.randn(7))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64])
def test_non_float_dtypes(dtype):
    x, w, b = _conv_args()
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor"):
        gankernels.conv3x3(x.to(dtype), w, b)
    with pytest.raises(TypeError, match=r"w: expected a floating-point tensor"):
        gankernels.conv3x3(x, w.to(dtype), b)
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor"):
        gankernels.max_pool2d(x.to(dtype), 2)
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor"):
        gankernels.upsample_nearest2d(x.to(dtype), 2)
    with pytest.raises(TypeError, match=r"b: expected a floating-point tensor"):
        gankernels.bias_act(x, b.to(dtype))


def test_mixed_float_dtypes_name_the_fix():
    x, w, b = _conv_args()
    with pytest.raises(TypeError, match=r"w: dtype torch.float16 differs from x's torch.float32; cast it"):
        gankernels.conv3x3(x, w.half(), b)
    with pytest.raises(TypeError, match=r"b: dtype torch.float64 differs"):
        gankernels.conv3x3(x, w, b.double())


def test_tensors_on_different_devices():
    x, w, b = _conv_args()
    meta_w = w.to("meta")
    with pytest.raises(ValueError, match=r"w: is on meta but x is on cpu"):
        gankernels.conv3x3(x, meta_w, b)
    with pytest.raises(ValueError, match=r"b: is on meta but x is on cpu"):
        gankernels.conv3x3(x, w, b.to("meta"))
    with pytest.raises(ValueError, match=r"b: is on meta"):
        gankernels.bias_act(x, b[:4].to("meta"))


@pytest.mark.parametrize("op", CONV_OPS + [gankernels.bias_act])
def test_unknown_act(op):
    x, w, b = _conv_args()
    args = (x, b[:4]) if op is gankernels.bias_act else (x, w, b)
    with pytest.raises(ValueError, match=r"act: unknown activation 'gelu'"):
        op(*args, act="gelu")


@pytest.mark.parametrize("op", CONV_OPS + [gankernels.bias_act])
def test_negative_clamp(op):
    x, w, b = _conv_args()
    args = (x, b[:4]) if op is gankernels.bias_act else (x, w, b)
    with pytest.raises(ValueError, match=r"clamp: must be >= 0"):
        op(*args, clamp=-1.0)
    with pytest.raises(TypeError, match=r"clamp: expected a non-negative number"):
        op(*args, clamp="1")
    with pytest.raises(TypeError, match=r"gain: expected a number"):
        op(*args, gain=None)


@pytest.mark.parametrize("scale", [1.5, 0, -2, "2", (2, 3), True])
def test_upsample_bad_scale(scale):
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"scale_factor: expected"):
        gankernels.upsample_nearest2d(x, scale)


def test_upsample_wrong_ndim():
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor"):
        gankernels.upsample_nearest2d(torch.randn(2, 3, 3), 2)


def test_max_pool_bad_arguments():
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(ValueError, match=r"padding: .* at most half"):
        gankernels.max_pool2d(x, 2, 2, 2)
    with pytest.raises(ValueError, match=r"kernel_size: every value must be >= 1"):
        gankernels.max_pool2d(x, 0)
    with pytest.raises(TypeError, match=r"stride: expected an int or a pair"):
        gankernels.max_pool2d(x, 2, 1.5)
    with pytest.raises(ValueError, match=r"x: spatial size .* too small"):
        gankernels.max_pool2d(torch.randn(1, 2, 1, 1), 2)
    with pytest.raises(ValueError, match=r"x: expected a 4-D"):
        gankernels.max_pool2d(torch.randn(2, 6), 2)


def test_bias_act_bad_dim_and_length():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"dim: 3 is out of range"):
        gankernels.bias_act(x, None, dim=3)
    with pytest.raises(ValueError, match=r"b: expected length 3 \(x.shape\[1\]\), got 4"):
        gankernels.bias_act(x, torch.randn(4))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
        gankernels.bias_act([1.0, 2.0])


def test_unknown_backend():
    x, w, b = _conv_args()
    with pytest.raises(ValueError, match=r"backend: unknown backend 'cudnn'; expected 'auto' or one of"):
        gankernels.conv3x3(x, w, b, backend="cudnn")


def test_modules_reject_bad_configuration():
    with pytest.raises(ValueError, match=r"act: unknown activation"):
        gankernels.nn.Conv3x3(3, 4, act="prelu")
    with pytest.raises(ValueError, match=r"act: unknown activation"):
        gankernels.nn.Conv2d(3, 4, 3, act="prelu")
    with pytest.raises(ValueError, match=r"clamp: must be >= 0"):
        gankernels.nn.UpConv3x3(3, 4, clamp=-1)


def test_env_report_lists_backends():
    from gankernels.env import report

    text = report()
    for op in ("conv3x3", "conv3x3_pool", "up_conv3x3", "max_pool2d", "upsample_nearest2d", "bias_act"):
        assert op in text
    assert "torch " in text and "triton " in text and "extension" in text
