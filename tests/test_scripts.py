"""The GPU-machine scripts parse and start on a CPU-only machine (they run for real on a GPU)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING_SCRIPTS = sorted((ROOT / "scripts").glob("gpu_time_*.py"))


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_timing_scripts_exist():
    names = {p.stem for p in TIMING_SCRIPTS}
    assert {"gpu_time_conv_fwd", "gpu_time_conv_bwd", "gpu_time_memops", "gpu_time_cuda", "gpu_time_bench"} <= names


@pytest.mark.parametrize("script", TIMING_SCRIPTS, ids=lambda p: p.stem)
def test_timing_script_help(script):
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout
