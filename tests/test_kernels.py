"""The fused Triton codec kernels (`pyg_adaqp.comm.kernels`) on a machine without a GPU.

Triton's interpreter runs them on CPU tensors when ``TRITON_INTERPRET=1`` is
set before they are defined, so `kernels_interpreted.py` runs in a fresh
interpreter with it set; the codec there sends CPU tensors through the
kernels.  On CUDA, `benchmarks/gpu_check.py` checks them on the device.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyg_adaqp.comm import kernels

HERE = Path(__file__).parent


def test_cpu_tensors_take_the_eager_codec():
    assert not kernels.usable(torch.zeros(2, 3))
    with kernels.codec_path(fused=True):
        assert not kernels.usable(torch.zeros(2, 3))


@pytest.mark.parametrize("value,enabled", [(None, False), ("0", False), ("1", True)])
def test_the_fused_kernels_are_off_unless_the_environment_asks(value, enabled):
    env = {k: v for k, v in os.environ.items() if k != "PYG_ADAQP_TRITON"}
    if value is not None:
        env["PYG_ADAQP_TRITON"] = value
    out = subprocess.run([sys.executable, "-c",
                          "from pyg_adaqp.comm import kernels; print(kernels._enabled)"],
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == str(enabled)


@pytest.mark.timeout(300)
def test_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(HERE / "kernels_interpreted.py")],
                          env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
