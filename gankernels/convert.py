"""Swap stock layers of an existing model for fused gankernels ones (placeholder; see issue 2)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ConversionReport:
    replaced: list = field(default_factory=list)
    left: list = field(default_factory=list)


def convert(model):
    raise NotImplementedError
