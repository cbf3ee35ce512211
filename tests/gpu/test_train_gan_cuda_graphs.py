"""``examples/train_gan.py --cuda-graphs`` (issue 12): the demo's recipe — lazy R1 (two
graphs: with and without the penalty), the translate augmentation, the learning-rate
ramp-down, the moving average, a mapping network — captured whole and replayed, trains
as the eager run does, step for step. Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from example_script import load_train_gan

pytestmark = pytest.mark.gpu

tg = load_train_gan()


@pytest.fixture(autouse=True)
def _one_config_per_kernel(monkeypatch):
    # The first surviving Triton configuration instead of autotuning every one: each run
    # meets a dozen new signatures, and the GPU test stage has minutes, not tens of them.
    from gankernels.triton import conv3x3 as tconv

    monkeypatch.setattr(tconv, "AUTOTUNE", False)


RECIPE = (
    "--width", "8", "--batch-size", "16", "--z-dim", "32", "--steps", "14", "--no-progress", "--device", "cuda",
    "--eval-every", "0", "--sample-every", "7", "--ckpt-every", "7", "--mapping", "2", "--mbstd", "4",
    "--translate", "2", "--r1", "0.1", "--r1-every", "2", "--lr-rampdown", "0.5", "--ema", "0.99",
)  # fmt: skip


@pytest.mark.parametrize("layers", ["stock", "gankernels"])
def test_the_captured_training_step_trains_as_eager(tmp_path, layers):
    runs = {}
    for graphs in (False, True):
        name = f"{layers}-{'graphs' if graphs else 'eager'}"
        argv = ["--name", name, "--runs-dir", str(tmp_path), "--layers", layers, *RECIPE]
        runs[graphs] = tg.train(tg.parse_args(argv + (["--cuda-graphs"] if graphs else [])))
    eager, captured = runs[False], runs[True]
    # 3 eager warm-ups of each kind (steps 0-5), then both kinds captured and replayed.
    assert captured["graphs"] == 2 and eager["graphs"] == 0
    want = torch.tensor([h[1:] for h in eager["history"]])
    got = torch.tensor([h[1:] for h in captured["history"]])
    # Capturable Adam (float32 learning rate and step count on the device) rounds
    # differently from the eager one: close, not equal.
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-4)
    ckpts = [torch.load(tmp_path / f"{layers}-{k}" / "checkpoint.pt", weights_only=True) for k in ("eager", "graphs")]
    for key in ("G", "G_ema", "D"):
        for name, value in ckpts[0][key].items():
            torch.testing.assert_close(ckpts[1][key][name], value, rtol=2e-3, atol=2e-4, msg=f"{key}.{name}")


def test_a_captured_run_resumes_eagerly_and_back(tmp_path):
    """A checkpoint of a captured run continues without --cuda-graphs (and the other way):
    the optimizers switch form (train_gan.set_capturable)."""
    argv = ["--runs-dir", str(tmp_path), "--layers", "gankernels", *RECIPE]
    full = tg.train(tg.parse_args(["--name", "full", *argv]))
    for name, first, then in (("to-eager", ["--cuda-graphs"], []), ("to-graphs", [], ["--cuda-graphs"])):
        tg.train(tg.parse_args(["--name", name, *argv, "--steps", "7", *first]))
        resumed = tg.train(tg.parse_args(["--name", name, *argv, "--resume", *then]))
        # Resumed at step 7: steps 7, 9, 11 warm up the plain step, 13 captures it; the
        # R1 steps 8, 10, 12 only warm up.
        assert resumed["graphs"] == (1 if then else 0) and [h[0] for h in resumed["history"]] == list(range(1, 15))
        torch.testing.assert_close(
            torch.tensor([h[1:] for h in resumed["history"]]),
            torch.tensor([h[1:] for h in full["history"]]),
            rtol=2e-3,
            atol=2e-4,
            msg=name,
        )
