"""The ``cuda`` backend: hand-written CUDA kernels from the C++ extension.

- :mod:`gankernels.cuda.loader` imports ``gankernels._C`` (built by ``setup.py``) or a
  library JIT-built on first use, and gives the extension's ops their fake kernels;
- :mod:`gankernels.cuda.jit_build` is that JIT build (a cache keyed by the sources,
  torch, nvcc and arch, under a lock);
- :mod:`gankernels.cuda.register` registers the backend's implementations with the
  dispatcher (imported by :mod:`gankernels.backends`).

The kernel sources live in the top-level ``csrc/``.
"""
