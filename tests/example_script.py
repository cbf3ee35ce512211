"""examples/train_gan.py as a module, for the tests of the example (CPU and GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_gan.py"


def load_train_gan():
    """Import the script (and, beside it, digits_judge) once per process."""
    if "train_gan" in sys.modules:
        return sys.modules["train_gan"]
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))  # train_gan imports digits_judge from its folder
    spec = importlib.util.spec_from_file_location("train_gan", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_gan"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
