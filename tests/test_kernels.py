"""The fused Triton codec kernels (`pyg_adaqp.comm.kernels`) on a machine without a GPU.

Triton's interpreter runs them on CPU tensors when ``TRITON_INTERPRET=1`` is
set before they are defined, so `kernels_interpreted.py` runs in a fresh
interpreter with it set; the codec there sends CPU tensors through the
kernels.  Triton's own compiler also builds them for a Hopper GPU (sm_90)
here, which catches what the lenient interpreter lets through.  On CUDA,
`benchmarks/gpu_check.py` checks and times them on the device.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyg_adaqp.comm import kernels

# The test extra installs Triton wherever it has wheels (Linux x86-64, as CI).
pytest.importorskip("triton")
HERE = Path(__file__).parent


def test_cpu_tensors_take_the_eager_codec():
    assert not kernels.usable(torch.zeros(2, 3))
    with kernels.codec_path(fused=True):
        assert not kernels.usable(torch.zeros(2, 3))


@pytest.mark.parametrize("value,enabled", [(None, False), ("0", False), ("1", True)])
def test_the_fused_kernels_are_off_unless_the_environment_asks(value, enabled, monkeypatch):
    # Read at each call, so a worker started with the variable set uses the kernels.
    monkeypatch.delenv("PYG_ADAQP_TRITON", raising=False)
    if value is not None:
        monkeypatch.setenv("PYG_ADAQP_TRITON", value)
    assert kernels.enabled() == enabled


@pytest.mark.timeout(300)
def test_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(HERE / "kernels_interpreted.py")],
                          env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def compile_for_hopper(kernel, constants: dict, types: dict) -> str:
    """PTX of `kernel` for an sm_90 GPU, built without one."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    names = list(kernel.arg_names)
    signature = {name: types.get(name, "constexpr") for name in names}
    constexprs = {(names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("variant", [(False, False, "*fp32"), (True, True, "*bf16")])
def test_kernels_compile_for_hopper(bits, variant):
    gather, wide, dtype = variant  # training's (contiguous buckets, float32), and the rest
    common = {"rows_ptr": "*i64", "lo_ptr": "*fp32", "scale_ptr": "*fp32", "n": "i32",
              "width": "i32", "nbytes": "i32"}
    ptx = compile_for_hopper(kernels._encode_kernel, {
        "BITS": bits, "HAS_ROWS": gather, "WIDE": wide, "BLOCK_R": 16, "BLOCK_D": 256}, {
        **common, "x_ptr": dtype, "x_stride": "i64", "seed_ptr": "*i64", "out_ptr": "*u8",
        "groups": "i32"})
    assert ".target sm_90" in ptx and "st.global" in ptx
    assert "div.rn.f32" in ptx  # IEEE division, as the eager ops
    ptx = compile_for_hopper(kernels._decode_kernel, {
        "BITS": bits, "HAS_ROWS": gather, "BLOCK_R": 16, "BLOCK_D": 256}, {
        **common, "payload_ptr": "*u8", "out_ptr": "*fp32", "out_stride": "i64"})
    assert ".target sm_90" in ptx and "st.global" in ptx


@pytest.mark.timeout(300)
def test_a_run_with_the_fused_kernels_resumes_exactly_in_the_interpreter(tmp_path):
    # gpu_check.py's resume group on CPU, the workers' codec in Triton's interpreter.
    out = tmp_path / "resume.json"
    env = {k: v for k, v in os.environ.items() if k != "PYG_ADAQP_TRITON"}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "gpu_check.py"),
                           "--device", "cpu", "--nodes", "800", "--only", "resume",
                           "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["eager", "eager", "fused", "fused"]
    assert all(r["ok"] and r["max_diff"] == 0 for r in rows), rows
    eager, fused = (r["final_loss"] for r in rows if "final_loss" in r)
    assert eager != fused  # the fused run drew its own dither: its workers ran the kernels
