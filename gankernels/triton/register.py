"""Importing this registers the Triton backend's implementations with the dispatcher.

Each kernel family is one module that registers its own ops when imported; a family
not written yet is skipped, one that fails to import is reported (via the dispatcher)
for the ops it would have served.
"""

from __future__ import annotations

import importlib

from gankernels.ops.dispatch import set_missing_reason

try:
    import triton  # noqa: F401
except Exception as e:  # noqa: BLE001
    set_missing_reason("triton", f"triton is not importable: {type(e).__name__}: {e}")
    FAMILIES: tuple[str, ...] = ()
else:
    # module -> the ops it registers
    FAMILIES = (
        "gankernels.triton.max_pool",  # max_pool2d
        "gankernels.triton.upsample",  # upsample_nearest2d
        "gankernels.triton.bias_act",  # bias_act
        "gankernels.triton.conv3x3",  # conv3x3, conv3x3_pool, up_conv3x3 forward
        "gankernels.triton.conv3x3_backward",  # their backward (re-registers the three ops)
    )

for _module in FAMILIES:
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as e:
        if e.name != _module:
            set_missing_reason("triton", f"could not import {_module}: {e}")
