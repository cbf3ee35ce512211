"""What :func:`gankernels.convert` did: the layers it replaced, the calls it fused in
forward code, and every candidate it left, with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConversionReport", "Fusion", "Left", "Replacement"]


@dataclass(frozen=True)
class Replacement:
    """One fused module put into the model.

    ``path``: where the fused module now lives (the position of the run's ``Conv2d``,
    or of the lone layer); ``stock``: the replaced modules as ``(path, type name)``;
    ``fused``: ``"gankernels.nn."`` and the ``repr`` of the new module.
    """

    path: str
    stock: tuple[tuple[str, str], ...]
    fused: str

    def __str__(self) -> str:
        run = " → ".join(name for _, name in self.stock)
        where = ", ".join(p for p, _ in self.stock)
        return f"{self.path}: {run} ⇒ {self.fused}  (stock at {where})"


@dataclass(frozen=True)
class Fusion:
    """One run of calls in a module's forward code replaced by one gankernels op.

    ``module``: the path of the module whose ``forward`` was rewritten (``"(root)"``
    for the model itself); ``where``: ``file:line`` of the run's last call in that
    forward; ``calls``: the stock calls, in order; ``op``: the gankernels op that now
    runs them; ``conv``: the path of the ``Conv2d`` whose parameters it uses.
    """

    module: str
    where: str
    calls: tuple[str, ...]
    op: str
    conv: str

    def __str__(self) -> str:
        return f"{self.module}.forward ({self.where}): {' → '.join(self.calls)} ⇒ {self.op}"


@dataclass(frozen=True)
class Left:
    """A candidate that was left as it is: ``path`` (a module, or the module whose
    forward holds the call), its ``module`` type name, ``reason``, and ``where``, the
    ``file:line`` in forward code it concerns (empty for a module in a Sequential)."""

    path: str
    module: str
    reason: str
    where: str = ""

    def __str__(self) -> str:
        at = f" at {self.where}" if self.where else ""
        return f"{self.path} ({self.module}){at}: {self.reason}"


@dataclass
class ConversionReport:
    """What :func:`convert` replaced, fused in forward code and left, and why."""

    replaced: list[Replacement] = field(default_factory=list)
    fused: list[Fusion] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"gankernels.convert: {len(self.replaced)} replaced, {len(self.fused)} fused in forward code, {len(self.left)} left"
        ]
        for title, entries in (("replaced", self.replaced), ("fused in forward code", self.fused), ("left", self.left)):
            if entries:
                lines.append(f"{title}:")
                lines += [f"  {e}" for e in entries]
        return "\n".join(lines)
