"""The decode main kernel compiled for a GPU on a machine without one: registers, spills,
shared memory and the instruction mix of its K loop, from Triton's compiler and the
``cuobjdump`` it bundles.

python benchmarks/sass_decode.py --shape 4096 4096 --rows 64
python benchmarks/sass_decode.py --shape 4096 4096 --rows 64 --config "(64, 1, 4, 8, 3, 6, 0, 1)"
python benchmarks/sass_decode.py --rows 16 --gluon "(128, 8, 8, 3)"   # MODE 8's Gluon kernel
python benchmarks/sass_decode.py --rows 1 --bank 0 --gemv "(32, 8, 4)"       # the one-row GEMV
python benchmarks/sass_decode.py --rows 64 --bank 64 --rank 64 --gluon "(64, 4, 8, 4)" --mode8-triton

The launch is the library's own: ``_decode._launch`` runs on CPU tensors with the kernels
replaced by recorders, and the recorded arguments are compiled for ``sm_<arch>`` with the
specialization Triton's launcher gives them (integers that are multiples of 16 marked so,
1 made a constant; without it every load is one byte wide and the listing is not what
runs). Programmatic dependent launch is compiled in where the GPU has it (``--arch`` 90 and
up). No timing: for that, ``tune_decode.py`` on a GPU. With ``--gluon`` (a ``TUNED_GLUON``
entry) the Gluon base kernel is compiled instead, and the bundled ``ptxas`` says whether
it serializes the kernel's ``wgmma``s (its C7513 notice).
"""

from __future__ import annotations

import argparse
import ast
import collections
import inspect
import os
import re
import subprocess
import tempfile

import torch
import triton
from common import make_hqq_layer
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hqqlora import _decode, _gluon, _gluon_gemv
from hqqlora._base import quant_layout, quant_tensors

_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _record(shape, rows, bank, dtype, config=None, gluon_entry=None, rank=16, gemv_entry=None):
    """Runs ``_decode._launch`` for one LoRA call (a bank of ``bank`` adapters read through
    an index, or one adapter when ``bank`` is 0) on CPU tensors, every kernel replaced by
    a recorder; ``config`` for ``TUNED``, ``gluon_entry`` for ``TUNED_GLUON`` and
    ``TUNED_GATHER`` (with ``_gluon.supported`` answering yes). Returns the main and
    Gluon kernels' calls and the layer's layout."""
    out_f, in_f = shape
    layer = make_hqq_layer(in_f, out_f, dtype=dtype)
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    bits, per = layout.packing_bits
    n = max(bank, 1)
    A, B, s = torch.zeros(n, rank, in_f), torch.zeros(n, out_f, rank), torch.ones(n)
    index = torch.arange(rows) % bank if bank else None
    if not bank:
        A, B, s = A[0], B[0], s[:1]
    x = torch.zeros(rows, in_f, dtype=dtype)
    saved = (dict(_decode.TUNED), dict(_decode.TUNED_GLUON), dict(_decode.TUNED_GATHER),
             _decode.PDL, _decode._main_kernel, _decode._shrink_kernel,
             _decode._bank_shrink_kernel, _gluon.supported, _gluon._base_kernel,
             _decode._bank_terms_kernel, _decode.GATHER_FOLD, dict(_decode.TUNED_GEMV),
             _decode.GEMV, _gluon_gemv._gemv_kernel)  # fmt: skip
    main, base = _Recorder(), _Recorder()
    try:
        if config is not None:
            _decode.TUNED[(out_f, in_f, per, rows)] = config
        if gluon_entry is not None:
            _decode.TUNED_GLUON[(out_f, in_f, rows)] = gluon_entry
            _decode.TUNED_GATHER[(out_f, in_f, rows)] = gluon_entry
            _gluon.supported = lambda *a: True
        if gemv_entry is not None:
            _decode.TUNED_GEMV[(out_f, in_f, rows)] = gemv_entry
            _decode.GEMV = True
            _gluon.supported = lambda *a: True
        _decode.PDL = False  # decided from the GPU's capability; compiled in below instead
        _decode.GATHER_FOLD = False  # the base kernel, not _gluon_fold's, is what --gluon compiles
        _decode._main_kernel, _decode._shrink_kernel = main, _Recorder()
        _decode._bank_shrink_kernel = _decode._bank_terms_kernel = _Recorder()
        _gluon._base_kernel = _gluon_gemv._gemv_kernel = base
        meta = [bits, per, layout.group_size, out_f, in_f]
        _decode._launch(
            x, W_q, scale, zero, meta, A, B, s, index, None, None, None, None, dtype
        )  # fmt: skip
    finally:
        for table, old in (
            (_decode.TUNED, saved[0]),
            (_decode.TUNED_GLUON, saved[1]),
            (_decode.TUNED_GATHER, saved[2]),
            (_decode.TUNED_GEMV, saved[11]),
        ):
            table.clear()
            table.update(old)
        (_decode.PDL, _decode._main_kernel, _decode._shrink_kernel, _decode._bank_shrink_kernel,
         _gluon.supported, _gluon._base_kernel, _decode._bank_terms_kernel,
         _decode.GATHER_FOLD) = saved[3:11]  # fmt: skip
        _decode.GEMV, _gluon_gemv._gemv_kernel = saved[12:]
    return main.calls, base.calls, layout


def recorded_launch(shape, rows, config, bank, dtype):
    """The main kernel's arguments for one LoRA call (see :func:`_record`), as
    ``_decode._launch`` makes them, and the configuration it would take by default."""
    calls, _, layout = _record(shape, rows, bank, dtype, config=config)
    per = layout.packing_bits[1]
    return calls[0], _decode.decode_config(*shape, per, layout.group_size, rows)


def recorded_gluon_launch(shape, rows, entry, bank, dtype, rank=16):
    """The Gluon base kernel's arguments for one LoRA call with ``TUNED_GLUON`` ``entry``,
    as ``_decode._launch`` makes them (see :func:`_record`), and those of the Triton
    kernel after it (MODE 8)."""
    main, base, _ = _record(shape, rows, bank, dtype, gluon_entry=entry, rank=rank)
    return base[0], main[0] if main else None


def compile_gluon(call, arch, kernel=None):
    """Compiles the recorded call of ``_gluon._base_kernel`` (or ``kernel``) for
    ``sm_<arch>`` (its tuple argument element by element, with the launcher's
    specialization)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel = kernel or _gluon._base_kernel
    _, args, kwargs = call
    names = list(inspect.signature(kernel.fn).parameters)
    options = {"num_warps": kwargs.pop("num_warps")}
    kwargs.pop("launch_pdl", None)
    constants = {(names.index(k),): v for k, v in kwargs.items()}
    constants[(names.index("num_warps"),)] = options["num_warps"]
    signature = {k: "constexpr" for k in kwargs}
    signature["num_warps"] = "constexpr"
    attrs = {}

    def one(path, value):
        if isinstance(value, torch.Tensor):
            attrs[path] = [["tt.divisibility", 16]]
            return "*" + _TYPES[value.dtype]
        if value == 1:  # Triton's launcher makes a 1 a constant
            constants[path] = 1
            return "constexpr"
        if value % 16 == 0:
            attrs[path] = [["tt.divisibility", 16]]
        return "i32"

    runtime = [n for n in names if n not in signature]
    for name, value in zip(runtime, args, strict=True):
        i = names.index(name)
        if isinstance(value, tuple):
            signature[name] = tuple(one((i, j), v) for j, v in enumerate(value))
        else:
            signature[name] = one((i,), value)
    src = GluonASTSource(
        kernel, {n: signature[n] for n in names}, constexprs=constants, attrs=attrs
    )
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def serialized_wgmma(compiled, arch):
    """Whether the bundled ``ptxas`` serializes the kernel's ``wgmma``s (notice C7513)."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run(
            [tool, f"-arch=sm_{arch}a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    return "C7513" in out.stdout + out.stderr


def compile_recorded(call, arch):
    """Compiles the recorded call of ``_decode._main_kernel`` for ``sm_<arch>``."""
    kernel = _decode._main_kernel
    _, args, kwargs = call
    names = list(inspect.signature(kernel.fn).parameters)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    kwargs.pop("launch_pdl", None)
    constants = dict(kwargs)
    constants["USE_PDL"] = constants["HAS_LORA"] and arch >= 90
    runtime = [n for n in names if n not in constants]
    signature, divisible = {}, []
    for name, value in zip(runtime, args, strict=True):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            divisible.append(name)
        elif value == 1:  # Triton's launcher makes a 1 a constant
            constants[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                divisible.append(name)
    for name in constants:
        signature[name] = "constexpr"
    src = ASTSource(
        kernel,
        {n: signature[n] for n in names},
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible},
    )
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def cuobjdump(compiled, flag):
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def loop_mix(sass):
    """Instruction counts of the first loop in the code (the K loop; the adapter terms'
    loops come after it)."""
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in code:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    if not loops:
        return 0, collections.Counter()
    start, end = min(loops)
    body = [t for a, t in code if start <= a <= end]
    ops = (t.split()[1] if t.startswith("@") else t.split()[0] for t in body)
    return len(body), collections.Counter(ops)


def tail_order(sass):
    """The memory operations, barriers and warp shuffles after the K loop, in program order
    (runs of one kind counted): where the tail's loads wait on one another."""
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    ends = [a for a, t in code if (m := re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", t))
            and int(m.group(1), 16) < a]  # fmt: skip
    after = min(ends) if ends else -1
    kinds = []
    for addr, text in code:
        op = (text.split()[1] if text.startswith("@") else text.split()[0]).split(".")[0]
        if addr > after and op in ("LDG", "STG", "ATOMG", "RED", "BAR", "SHFL", "LDS", "STS"):
            if kinds and kinds[-1][0] == op:
                kinds[-1][1] += 1
            else:
                kinds.append([op, 1])
    return " ".join(f"{op}×{n}" if n > 1 else op for op, n in kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--gemv", type=ast.literal_eval, help="a TUNED_GEMV entry: the one-row tensor-core GEMV"
    )
    parser.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), help="out in")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--config", type=ast.literal_eval, help="a TUNED entry to compile")
    parser.add_argument("--bank", type=int, default=1, help="adapters in a bank (0: one)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--top", type=int, default=16, help="instructions to list")
    parser.add_argument(
        "--gluon", type=ast.literal_eval, help="a TUNED_GLUON entry: MODE 8's Gluon kernel"
    )
    parser.add_argument(
        "--mode8-triton",
        action="store_true",
        help="with --gluon: MODE 8's Triton kernel after the Gluon kernel instead",
    )
    parser.add_argument("--rank", type=int, default=16, help="the adapters' rank")
    parser.add_argument(
        "--finish-rows", type=int, help="_decode.FINISH_ROWS, 0-16 (rows the Gluon kernel finishes)"
    )
    args = parser.parse_args()
    if args.finish_rows is not None:
        if not 0 <= args.finish_rows <= 16:
            parser.error(
                f"--finish-rows takes 0 to 16 (the Gluon finish's limit), got {args.finish_rows}"
            )
        _decode.FINISH_ROWS = args.finish_rows
    dtype = getattr(torch, args.dtype)
    if args.gemv is not None:
        _, base, _ = _record(tuple(args.shape), args.rows, args.bank, dtype, gemv_entry=args.gemv)
        if not base:
            parser.error(f"the GEMV does not take {args.rows} row(s) at {tuple(args.shape)}")
        compiled = compile_gluon(base[0], args.arch, _gluon_gemv._gemv_kernel)
        default = args.gemv
    elif args.gluon is not None:
        call, after = recorded_gluon_launch(
            tuple(args.shape), args.rows, args.gluon, args.bank, dtype, args.rank
        )
        default = args.gluon
        if args.mode8_triton:
            if after is None:
                parser.error("the Gluon kernel finishes these rows: no Triton kernel")
            compiled = compile_recorded(after, args.arch)
            print(f"MODE 8's Triton kernel: BLOCK_P {after[2]['BLOCK_P']}, grid {after[0]}")
        else:
            compiled = compile_gluon(call, args.arch)
            serial = serialized_wgmma(compiled, args.arch)
            print(f"wgmma serialized by ptxas (C7513): {'yes' if serial else 'no'}")
    else:
        call, default = recorded_launch(tuple(args.shape), args.rows, args.config, args.bank, dtype)
        compiled = compile_recorded(call, args.arch)
    usage = cuobjdump(compiled, "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    sass = cuobjdump(compiled, "-sass")
    length, mix = loop_mix(sass)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}")
    print(f"{tuple(args.shape)} at {args.rows} rows, config {args.config or default}")
    print(
        f"registers {regs.group(1) if regs else '?'}, stack {stack.group(1) if stack else '?'} B,"
        f" shared {compiled.metadata.shared} B, cp.async in the PTX"
        f" {compiled.asm['ptx'].count('cp.async.cg') + compiled.asm['ptx'].count('cp.async.ca')}"
    )
    print(f"K loop: {length} instructions a thread a step")
    for op, count in mix.most_common(args.top):
        print(f"    {count:5d}  {op}")
    print(f"after the K loop: {tail_order(sass)}")


if __name__ == "__main__":
    main()
