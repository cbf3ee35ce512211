"""``python -m gankernels.bench``: stock PyTorch vs torch.compile vs gankernels.

On a CUDA GPU: the ANCHORS.md cases (batch 64; bf16 and fp32; channels_last; forward
and forward+backward) and the DCGAN training step. On CPU: the same protocol at tiny
shapes, which only shows it works. See ``--help`` and ``benchmarks/README.md``.
"""

from __future__ import annotations

import sys

from gankernels.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
