"""How the conv kernels pick their tile configuration on a GPU: a list per GPU family,
ordered most-generally-good first (by the static issue load, ``python -m gankernels.bench
static --all-configs``), pruned per call by the kernel family's own rule (tiles larger than
the problem, shared memory, registers), then either autotuned over what survives (the
default) or, with ``GANKERNELS_TRITON_AUTOTUNE=0``, the first survivor launched as is.

One :class:`FamilyTuning` per kernel; the kernel module keeps its lists and pruning rule
(what ``gankernels.bench.aot`` compiles ahead of time reads them through
:meth:`FamilyTuning.candidates`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton


def gpu_family(device: torch.device) -> str:
    """``"hopper"`` (sm_90 and later) or ``"ampere"`` (everything else)."""
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major >= 9 else "ampere"


class FamilyTuning:
    """A kernel's configurations per GPU family and how a launch chooses among them.

    ``configs``: family → list of ``triton.Config``; ``prune(configs, named_args,
    smem_limit=..., **constexprs)`` → the survivors in list order (never empty), the
    signature of Triton's ``early_config_prune``; ``smem_limit``: family → bytes of
    shared memory a CTA may use; ``key``: the autotuner's cache key.
    """

    def __init__(
        self,
        kernel: Any,
        key: Sequence[str],
        configs: dict[str, list[triton.Config]],
        prune: Callable[..., list[triton.Config]],
        smem_limit: dict[str, int],
    ) -> None:
        self.kernel, self.key, self.configs, self.prune, self.smem_limit = kernel, list(key), configs, prune, smem_limit
        self._autotuned: dict[str, Any] = {}
        self._lock = threading.Lock()

    def candidates(self, family: str) -> tuple[list[triton.Config], Callable[..., list[triton.Config]]]:
        """The family's list and its pruning rule (with the family's shared-memory limit)."""
        return self.configs[family], functools.partial(self.prune, smem_limit=self.smem_limit[family])

    def first(self, family: str, named_args: dict[str, Any], **constexprs: Any) -> triton.Config:
        """The first configuration that survives pruning: what ``GANKERNELS_TRITON_AUTOTUNE=0``
        launches."""
        configs, prune = self.candidates(family)
        return prune(configs, named_args, **constexprs)[0]

    def autotuned(self, family: str) -> Any:
        """The autotuned launcher for a family (built on first use, so importing a kernel
        module never initialises CUDA)."""
        with self._lock:
            k = self._autotuned.get(family)
            if k is None:
                configs, prune = self.candidates(family)
                k = triton.autotune(configs=configs, key=self.key, prune_configs_by={"early_config_prune": prune})(self.kernel)
                self._autotuned[family] = k
        return k

    def launch(self, grid, args: tuple, consts: dict[str, Any], device: torch.device, autotune: bool, named_args: dict) -> None:
        """Launch on a CUDA ``device``: autotuned, or the first surviving configuration
        (``named_args``: what the pruning rule reads, e.g. the channel counts and x)."""
        family = gpu_family(device)
        with torch.cuda.device(device):
            if autotune:
                self.autotuned(family)[grid](*args, **consts)
            else:
                cfg = self.first(family, named_args, **consts)
                self.kernel[grid](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
