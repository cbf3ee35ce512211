"""How the conv kernels choose a tile configuration on a GPU (gankernels/triton/tuning.py),
checked on CPU: the configuration ``GANKERNELS_TRITON_AUTOTUNE=0`` launches is the one the
recorded static report compiled (the first survivor), and a launch goes to the autotuner or
to that configuration as asked."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from gankernels.bench.aot import cfg_label  # noqa: E402
from gankernels.triton import conv3x3 as tconv  # noqa: E402
from gankernels.triton import tuning  # noqa: E402
from gankernels.triton import up_conv3x3 as tup  # noqa: E402
from gankernels.triton import up_conv3x3_pairs as tpair  # noqa: E402

STATIC = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "static-3.8.0" / "static.json"


def _recorded_forward(op: str) -> dict[tuple[int, int], str]:
    rows = json.loads(STATIC.read_text())["rows"]
    out = {}
    for r in rows:
        if r["kernel"] == "forward" and r["op"] == op:
            ci, co = (int(v) for v in r["shape"].split(" @")[0].split("->"))
            out[ci, co] = r["config"]
    return out


def test_the_first_survivor_is_what_the_static_report_compiled():
    """The up-conv rows of the recorded report (bf16, hopper) name the configuration each
    kernel's heuristic pick gives for their channel counts."""
    recorded = _recorded_forward("up_conv3x3")
    assert len(recorded) == 4
    x = torch.empty(0, dtype=torch.bfloat16)
    for (ci, co), label in recorded.items():
        module = (
            tpair
            if tpair.serves(torch.empty(1, ci, 1, 1).contiguous(memory_format=torch.channels_last), torch.empty(co, ci, 3, 3))
            else tup
        )
        assert cfg_label(module._TUNING.first("hopper", {"x_ptr": x}, CI=ci, CO=co)) == label, (ci, co, module.__name__)


@pytest.mark.parametrize("op", ["conv3x3", "conv3x3_pool"])
def test_the_conv_rows_first_survivor_is_what_the_static_report_compiled(op):
    recorded = _recorded_forward(op)
    assert len(recorded) == 4
    mode = tconv.MODE_POOL if op == "conv3x3_pool" else tconv.MODE_CONV
    x = torch.empty(0, dtype=torch.bfloat16)
    for (ci, co), label in recorded.items():
        out = torch.empty(1, co, 2, 2).contiguous(memory_format=torch.channels_last)  # the report's layout
        named = {"Co": co, "Ci": ci, "x_ptr": x, "out_ptr": out}
        first = tconv._TUNING.first("hopper", named, FLAT_K=ci < tconv._FLAT_K_BELOW, MODE=mode)
        assert cfg_label(first) == label, (op, ci, co)


class _Kernel:
    """Stands for a jitted kernel: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, grid, args, kwargs))


def test_a_launch_autotunes_or_takes_the_first_survivor(monkeypatch):
    calls, built = [], []
    monkeypatch.setattr(tuning, "gpu_family", lambda device: "hopper")
    monkeypatch.setattr(tuning.torch.cuda, "device", lambda device: contextlib.nullcontext())

    def autotune(configs, key, prune_configs_by):
        built.append((list(configs), key, prune_configs_by["early_config_prune"]))
        return lambda kernel: _Kernel("autotuned", calls)

    monkeypatch.setattr(tuning.triton, "autotune", autotune)
    t = tuning.FamilyTuning(
        _Kernel("plain", calls), tup._TUNE_KEY, {"hopper": tup._CONFIGS_HOPPER, "ampere": []}, tup._prune_configs, tup._SMEM_LIMIT
    )
    x = torch.empty(0, dtype=torch.bfloat16)
    consts = dict(CI=256, CO=128, ACT=1)
    t.launch((7,), (x, 1), consts, torch.device("cuda"), autotune=False, named_args={"x_ptr": x})
    first = tup._prune_configs(tup._CONFIGS_HOPPER, {"x_ptr": x}, smem_limit=tup._SMEM_LIMIT["hopper"], **consts)[0]
    name, grid, args, kwargs = calls.pop()
    assert (name, grid, args) == ("plain", (7,), (x, 1))
    assert kwargs == {**consts, **first.kwargs, "num_warps": first.num_warps, "num_stages": first.num_stages}
    for _ in range(2):
        t.launch((7,), (x, 1), consts, torch.device("cuda"), autotune=True, named_args={"x_ptr": x})
        assert calls.pop() == ("autotuned", (7,), (x, 1), consts)
    assert len(built) == 1  # the autotuner is built once per family
    tuned_configs, key, prune = built[0]
    assert tuned_configs == tup._CONFIGS_HOPPER and key == tup._TUNE_KEY
    assert prune(tuned_configs, {"x_ptr": x}, **consts)[0] == first  # the family's shared-memory limit bound
