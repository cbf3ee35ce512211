import os

import pytest
import torch

# Triton-interpreter tests run in their own process (TRITON_INTERPRET=1 must be set
# before kernels are defined): `make test-interpreter`.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreter"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny CPU tensors: OpenMP hand-offs between threads cost more than the work
    # (seen: 60 ms vs 0.05 ms per small conv on a loaded 2-core machine).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fake_timer(monkeypatch, tmp_path):
    """Let ``auto`` time candidates on CPU with a fake clock: set ``times[backend] = ms``.
    Each timed run is executed once (so it must work); the choice cache lives in
    tmp_path and starts empty."""
    from gankernels.ops import choice

    monkeypatch.setenv("GANKERNELS_CACHE_DIR", str(tmp_path))
    times: dict[str, float] = {}
    runs: list[str] = []

    def timer(run, device, backend):
        run()
        runs.append(backend)
        return times[backend]

    choice.clear()
    choice.set_timer(timer, devices=("cpu",))
    times["_runs"] = runs  # type: ignore[assignment]
    yield times
    choice.reset_timer()
    choice.clear()
