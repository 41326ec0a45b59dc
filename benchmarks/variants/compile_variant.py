"""Offline sm_90 compile of a kernel variant in this folder (no GPU): its register use and
how many barriers, mbarrier operations and register reallocations the compiler emitted.

VARIANT=gluon_ws python benchmarks/variants/compile_variant.py 4096 4096 64 "(64, 4, 4, 3)"
VARIANT=gluon_pp KERNEL=_pp_kernel python benchmarks/variants/compile_variant.py \
    4096 4096 64 "(64, 4, 4, 4)"

Arguments: out, in, rows, a launch (packed rows a program, K splits, warps, stages), then
``NAME=VALUE`` module attributes of the variant. ``PTX_OUT=path`` writes the PTX.
"""

import inspect
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import importlib

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

V = importlib.import_module(os.environ.get("VARIANT", "gluon_ws"))

_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
}


def compile_call(kernel, args, kwargs, arch=90):
    names = list(inspect.signature(kernel.fn).parameters)
    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps")}
    if "maxnreg" in kwargs:
        options["maxnreg"] = kwargs.pop("maxnreg")
    constants = {(names.index(k),): v for k, v in kwargs.items()}
    constants[(names.index("num_warps"),)] = options["num_warps"]
    signature = {k: "constexpr" for k in kwargs}
    signature["num_warps"] = "constexpr"
    attrs = {}
    runtime = [n for n in names if n not in signature]
    for name, value in zip(runtime, args, strict=True):
        i = names.index(name)
        if isinstance(value, torch.Tensor):
            attrs[(i,)] = [["tt.divisibility", 16]]
            signature[name] = "*" + _TYPES[value.dtype]
        elif value == 1:
            constants[(i,)] = 1
            signature[name] = "constexpr"
        else:
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
            signature[name] = "i32"
    src = GluonASTSource(
        kernel, {n: signature[n] for n in names}, constexprs=constants, attrs=attrs
    )
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def main():
    n_out, k_in, rows = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    block_p, split, warps, stages = eval(sys.argv[4])
    for a in sys.argv[5:]:
        k, v = a.split("=")
        setattr(V, k, eval(v))
    x = torch.zeros(rows, k_in, dtype=torch.bfloat16)
    W_q = torch.zeros(n_out // 2, k_in, dtype=torch.uint8)
    scale = torch.zeros(n_out, k_in // 64, dtype=torch.bfloat16)
    zero = torch.zeros_like(scale)
    ws = torch.zeros(split, rows, n_out)
    _grid, args, kwargs = V.launch_args(
        x,
        W_q,
        scale,
        zero,
        [4, 2, 64, n_out, k_in],
        ws,
        block_p=block_p,
        split=split,
        warps=warps,
        stages=stages,
        after_shrink=False,
        before_shrink=True,
    )
    c = compile_call(getattr(V, os.environ.get("KERNEL", "_ws_kernel")), args, kwargs)
    import sass_decode

    usage = sass_decode.cuobjdump(c, "--dump-resource-usage")
    print(usage.strip().splitlines()[-1][:300], "shared", c.metadata.shared)
    ptx = c.asm["ptx"]
    for pat in [
        "mbarrier.arrive",
        "cp.async.mbarrier",
        "bar.sync",
        "bar.arrive",
        "setmaxnreg",
        "fence.proxy",
        "mbarrier.try_wait",
        "barrier.sync",
    ]:
        print(pat, len(re.findall(re.escape(pat), ptx)))
    out = os.environ.get("PTX_OUT")
    if out:
        with open(out, "w") as f:
            f.write(ptx)


if __name__ == "__main__":
    main()
