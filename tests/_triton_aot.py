"""Compile metalr's Triton kernels for a CUDA target without a GPU (run by tests/test_triton_kernels.py
in a subprocess without TRITON_INTERPRET): the interpreter does not type-check what the compiler does.

Prints one line per compiled variant with its registers per thread and spill bytes (``ptxas -v``
on the PTX, the ptxas in triton's wheel); exits non-zero on the first compile error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from metalr.functional import _triton_kernels as K

TABLES = ("numels", "chunk_tensor", "chunk_start", "chunk_slot")
ADAM = {n: "*i64" for n in ("p_tab", "g_tab", "m_tab", "v_tab", *TABLES)}
ADAM |= {"steps": "*fp32", "rates": "*fp32", "lr_ptr": "*fp32", "keep_ptr": "*i32",
         "partials": "*fp32", "max_chunks": "i32", "beta1": "fp32", "beta2": "fp32",
         "eps": "fp32", "weight_decay": "fp32", "sign": "fp32", "restart_ptr": "*i32",
         "sizes": "*fp32"}  # fmt: skip
SGD = {n: "*i64" for n in ("p_tab", "g_tab", "b_tab", "d_tab", *TABLES)}
SGD |= {"rates": "*fp32", "lr_ptr": "*fp32", "keep_ptr": "*i32", "partials": "*fp32",
        "max_chunks": "i32", "momentum": "fp32", "dampening": "fp32", "weight_decay": "fp32",
        "sign": "fp32"}  # fmt: skip


def registers(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) of ``ptx`` for sm_90, from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        done = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", f.name, "-o",
                               os.devnull], capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    return int(regs.group(1)), int(spills.group(1)) if spills else 0


def compile_variant(kernel, types: dict[str, str], consts: dict) -> None:
    signature = {n: "constexpr" if n in consts else types[n] for n in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(k),): v for k, v in consts.items()}
    src = ASTSource(kernel, signature, constexprs=constexprs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": K.NUM_WARPS}
    )
    regs, spills = registers(compiled.asm["ptx"])
    print(kernel.fn.__name__, consts, f"registers={regs} spills={spills}", flush=True)


def main() -> int:
    for dtype in (tl.float32, tl.bfloat16):
        modes = (
            ((True, True), (True, False), (False, True)) if dtype == tl.float32 else ((True, True),)
        )
        for acc, write in modes:
            compile_variant(K._adam_kernel, ADAM, {"DECOUPLED": dtype == tl.bfloat16,
                            "ACCUMULATE": acc, "WRITE": write, "RESTART": False,
                            "DTYPE": dtype, "BLOCK": K.BLOCK})  # fmt: skip
            for buf, direction, nesterov in ((True, False, False), (False, True, False),
                                             (True, True, True)):  # fmt: skip
                compile_variant(K._sgd_kernel, SGD, {"HAS_BUF": buf, "HAS_DIR": direction,
                                "NESTEROV": nesterov, "ACCUMULATE": acc, "WRITE": write,
                                "DTYPE": dtype, "BLOCK": K.BLOCK})  # fmt: skip
        # the exact step's writing launch that restarts Adam's moments at the ramp's turn
        compile_variant(K._adam_kernel, ADAM, {"DECOUPLED": dtype == tl.bfloat16,
                        "ACCUMULATE": False, "WRITE": True, "RESTART": True, "DTYPE": dtype,
                        "BLOCK": K.BLOCK})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
