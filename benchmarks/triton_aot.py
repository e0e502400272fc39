"""Compile our Triton kernels for a GPU architecture on a machine without one (issue 12).

    python benchmarks/triton_aot.py [--arch 90]      # needs triton (not in the CPU venv)

The device run (benchmarks/gpu_check.sh) gets minutes of GPU time; a kernel that does not build
under the device's Triton would spend them on a traceback. Triton compiles to PTX and cubin
without a GPU (its bundled ptxas), so this builds every kernel for `--arch` (90 = H100/H200) in
each storage dtype the engine uses, and fails on any front-end, type or lowering error. It does
not run them: their numbers are checked against the torch forms by tests/test_triton_*.py, on
CUDA or under TRITON_INTERPRET=1 (Triton >= 3.7's interpreter; 3.6's cannot bound a loop by a
loaded scalar, which compiled code can). A wrong signature here (a kernel's arguments changed)
fails too, so the two stay in step.
"""

from __future__ import annotations

import argparse

import triton
from triton.backends.compiler import GPUTarget

from peftserve.adapters import lora_triton
from peftserve.server.engine import triton_attention

STRIDE = "i64"


def kernels(dtype: str) -> list[tuple[object, dict[str, str], dict[str, int]]]:
    """(kernel, argument types, constexpr values) as the launchers call them with `dtype` storage."""
    attention = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "table_ptr": "*i64",
                 "counts_ptr": "*i64", "widths_ptr": "*i64", "out_ptr": "*fp32", "scaling": "fp32",
                 **{name: STRIDE for name in ("stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kt",
                                              "stride_tb", "stride_cb", "stride_ob", "stride_oh")}}
    shrink = {"x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "slots_ptr": "*i64", "ranks_ptr": "*i64",
              "scale_ptr": "*fp32", "h_ptr": "*fp32", "IN": "i32", "R": "i32",
              "stride_xt": STRIDE, "stride_ai": STRIDE, "stride_as": STRIDE}
    expand = {"h_ptr": "*fp32", "b_ptr": f"*{dtype}", "slots_ptr": "*i64", "ranks_ptr": "*i64",
              "out_ptr": f"*{dtype}", "OUT": "i32", "R": "i32",
              "stride_bs": STRIDE, "stride_br": STRIDE, "stride_ot": STRIDE}
    return [
        (triton_attention._table_decode_kernel, attention, {"GROUPS": 4, "BS": 64, "D": 64, "SUB": triton_attention.SUB_TILE}),
        (lora_triton._shrink_kernel, shrink, {"BLOCK_IN": lora_triton.BLOCK_IN, "BLOCK_R": lora_triton.BLOCK_R}),
        (lora_triton._expand_kernel, expand, {"BLOCK_R": lora_triton.BLOCK_R, "BLOCK_OUT": lora_triton.BLOCK_OUT}),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: Hopper)")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    for dtype in ("fp32", "bf16", "fp16"):
        for kernel, signature, constexprs in kernels(dtype):
            missing = set(kernel.arg_names) - set(signature) - set(constexprs)
            if missing:
                raise SystemExit(f"{kernel.__name__}: no type given here for {sorted(missing)}")
            source = triton.compiler.ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs,
                                                                                               "constexpr")},
                                               constexprs=constexprs)
            compiled = triton.compile(source, target=target)
            print(f"sm_{args.arch} {dtype:4s} {kernel.__name__:22s} {len(compiled.asm['cubin']):6d} bytes of cubin")
    print(f"triton {triton.__version__}: every kernel builds for sm_{args.arch}")


if __name__ == "__main__":
    main()
