"""Tries launch configurations of the decode kernels (CUDA) and prints the best per shape.

python benchmarks/tune_decode.py            # prints a dict to paste into hqqlora/_decode.py TUNED

Each configuration is checked against the float64 product before it is timed.
"""

from __future__ import annotations

import contextlib

import torch
import triton.testing
from common import environment, make_hqq_layer

import hqqlora
from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
TOKENS = [1, 16, 64]


def mode6_candidates(tokens, in_f):
    """MODE 6 (HQQ's weights dequantized in registers, several groups a tensor-core step)."""
    steps = in_f // 64
    grid = [(b, g, sp, w, st, 6) for b in (16, 32, 64) for g in (1, 2, 4) for sp in (1, 2, 4, 8)
            for w in (4, 8) for st in (3, 4)]  # fmt: skip
    if tokens <= 16:  # one step a program or nearly (a one-shot split-K, as MODE 4's)
        grid += [(b, g, 16, w, st, 6) for b in (16, 32) for g in (1, 2, 4) for w in (4, 8)
                 for st in (1, 2, 3)]  # fmt: skip
        grid += [(32, 1, 16, 4, st, 5) for st in (1, 2, 3)]
    return [c for c in grid if c[1] * c[2] <= steps and (tokens > 16 or c[0] <= 32)]


def wide_candidates(tokens, in_f):
    """Few splits and small tiles (fewer partials to store and sum, no counters at one split),
    the corner the default grids leave out: MODE 4 at one row, MODES 5 and 6 up to 16 rows;
    above, MODE 6 at 1-8 splits (rows per split decide the adapter term's path)."""
    steps = in_f // 64
    if tokens == 1:
        grid = [(b, g, sp, w, st, 4) for b in (2, 4, 8, 16) for g in (4, 16) for sp in (1, 2, 4)
                for w in (2, 4) for st in (1, 3)]  # fmt: skip
    elif tokens > 16:
        grid = [(b, 1, sp, w, 3, 6) for b in (16, 32, 64) for sp in (1, 2, 4, 8) for w in (4, 8)]
    else:
        grid = [(b, 1, sp, 4, st, m) for b in (8, 16, 32) for sp in (1, 2, 4) for st in (3, 4, 5)
                for m in (5, 6)]  # fmt: skip
        grid += [(b, 2, sp, 4, st, 6) for b in (8, 16, 32) for sp in (1, 2, 4) for st in (3, 4)]
    return [c for c in grid if c[1] * c[2] <= steps]


def deep_candidates(tokens, in_f):
    """MODE 4 at one row with long K steps (up to all of K in one): few outputs a program,
    one or few splits, so no counter or a short finish (torch's tinygemm, 0.78× gemlite at
    4096², splits K only across the warps of one program)."""
    steps = in_f // 64
    if tokens != 1:
        return []
    grid = [(b, g, sp, w, st, 4) for b in (1, 2, 4, 8) for g in (16, 32, 64) for sp in (1, 2, 4)
            for w in (4, 8) for st in (1, 3)]  # fmt: skip
    # at most 128 float32 codes a thread: 2b outputs × 64g inputs over 32w threads
    return [c for c in grid if c[1] * c[2] <= steps and c[0] * c[1] <= 32 * c[3]]


def tc1_candidates(tokens, in_f):
    """The tensor-core modes at one row (``x`` padded to 16 rows): MODE 5 (exact codes),
    6 and 7 (HQQ's rounded weights, several groups a step), small tiles, many splits."""
    steps = in_f // 64
    if tokens != 1:
        return []
    grid = [(b, g, sp, 4, st, m) for b in (8, 16, 32) for g in (1, 2, 4) for sp in (8, 16)
            for st in (1, 2) for m in (6, 7)]  # fmt: skip
    grid += [(b, 1, sp, 4, st, 5) for b in (8, 16, 32) for sp in (8, 16) for st in (1, 2)]
    return [c for c in grid if c[1] * c[2] <= steps]


def regs_candidates(tokens):
    """The tuned shapes' configurations with the main kernel's registers capped (more
    programs resident: at 16 rows 102 registers allow 4 programs an SM, ncu on an H100)."""
    if tokens == 1:
        base = [(32, 4, 16, 4, 1, 4), (4, 16, 4, 2, 3, 4)]
        caps = (0, 40, 48, 64)
    elif tokens <= 16:
        base = [(32, 1, 16, 4, st, 5) for st in (1, 2, 3)] + [(32, 1, 16, 2, 2, 5),
                (32, 1, 16, 4, 2, 6), (32, 1, 4, 4, 3, 5)]  # fmt: skip
        caps = (0, 56, 64, 80)
    else:
        base = [(64, 1, 4, 8, 3, 6), (32, 1, 4, 4, 3, 6), (32, 1, 8, 4, 3, 6)]
        caps = (0, 64, 96, 128)
    return [(*c, cap) for c in base for cap in caps]


def prefetch_candidates(tokens):
    """The tuned shapes' neighbourhood at each PREFETCH level (0: Triton's own pipelining
    of codes and x, scale and zero loaded in the step that uses them; 1: scale and zero a
    step ahead; 2: codes and x too, in registers)."""
    if tokens == 1:
        base = [(32, 4, sp, 4, 1, 4, 0) for sp in (4, 8, 16)]
        base += [(32, 2, 8, 4, 1, 4, 0), (16, 4, 4, 4, 1, 4, 0), (32, 4, 4, 4, 2, 4, 0)]
    elif tokens <= 16:
        base = [(32, 1, sp, 4, st, 5, cap) for sp in (4, 8, 16) for st in (2, 3) for cap in (0, 64)]
    else:
        base = [(64, 1, sp, 8, st, 6, 0) for sp in (2, 4, 8) for st in (2, 3, 4)]
        base += [(32, 1, sp, 4, 3, 6, cap) for sp in (4, 8) for cap in (0, 128)]
    return [(*c, pf) for c in base for pf in (0, 1, 2)]


def mode7_candidates(tokens):
    """MODE 7 (MODE 6's weights in packed compute-dtype instructions) beside MODE 6 (and
    MODE 5 at 16 rows) at the tuned neighbourhood, PREFETCH 1 and 2."""
    if tokens <= 16:
        base = [(32, 1, sp, 4, st, m, 0) for sp in (4, 8, 16) for st in (2, 3) for m in (5, 7)]
    else:
        base = [(64, 1, sp, 8, st, m, 0) for sp in (4, 8) for st in (3, 4) for m in (6, 7)]
        base += [(32, 1, sp, 4, 3, m, cap) for sp in (4, 8) for cap in (0, 128) for m in (6, 7)]
    return [(*c, pf) for c in base for pf in (1, 2)]


def _warm(job):
    """Runs each configuration of ``job`` once (a worker process): Triton compiles it into
    its on-disk cache, so the timing process finds it there."""
    (out_f, in_f), tokens, rank, bank, configs = job
    torch.manual_seed(0)
    layer = make_hqq_layer(in_f, out_f, device="cuda")
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    _, per = layout.packing_bits
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    A, B, s, index = _adapters(in_f, out_f, rank, bank, tokens)
    for config in configs:
        _decode.TUNED[(out_f, in_f, per, tokens)] = config
        with contextlib.suppress(Exception):  # the timing process reports failures
            _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s,
                                index=index)  # fmt: skip
    torch.cuda.synchronize()


def _adapters(in_f, out_f, rank, bank, tokens):
    """One adapter (``bank`` 0) or a bank of ``bank`` adapters, row i reading i mod bank."""
    n = max(bank, 1)
    A = torch.randn(n, rank, in_f, device="cuda") / in_f**0.5
    B = torch.randn(n, out_f, rank, device="cuda") * 0.01
    s = torch.ones(n, device="cuda")
    if bank == 0:
        return A[0], B[0], s[:1], None
    return A, B, s, torch.arange(tokens, device="cuda") % bank


def _reference(x, W, A, B, index):
    """``x @ Wᵀ + x @ Aᵀ @ Bᵀ`` in float64 (per row ``A[index]``, ``B[index]`` for a bank;
    the scaling is 1)."""
    if index is None:
        return x.double() @ W.T + (x.double() @ A.double().T) @ B.double().T
    t = torch.einsum("mk,mrk->mr", x.double(), A[index].double())
    return x.double() @ W.T + torch.einsum("mr,mnr->mn", t, B[index].double())


def precompile(jobs, workers=12):
    """Compiles every configuration in parallel worker processes (Triton's compile is
    CPU-bound and serial in one process)."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_warm, jobs))


def candidates(tokens, in_f, explore=False):
    """Configurations to try: MODE 4 (CUDA-core GEMV) at one row, MODE 3 (tensor cores,
    exponent-trick codes) above, a few of the older modes for comparison."""
    steps = in_f // 64
    if tokens == 1:
        grid = [(b, g, sp, w, st) for b in (16, 32, 64) for g in (2, 4, 8) for sp in (8, 16, 32)
                for w in (2, 4, 8) for st in (1,)] if explore else [
            (b, g, sp, w, st) for b in (8, 16, 32) for g in (1, 4) for sp in (8, 16, 64)
            for w in (2, 4) for st in (1, 3)]  # fmt: skip
        configs = [(*c, 4) for c in grid if c[1] * c[2] <= steps]
        if not explore:
            configs += [(b, 1, sp, 4, st, 3) for b in (32, 64) for sp in (4, 8) for st in (2, 3)]
        return configs
    if explore:
        configs = [(b, 1, sp, w, st, 5) for b in (32, 64, 128) for sp in (4, 8, 16)
                   for w in (4, 8) for st in (3, 4)]  # fmt: skip
        configs += [(b, 1, sp, 4, st, 3) for b in (64, 128) for sp in (4, 8) for st in (3, 4)]
        return [c for c in configs if c[2] <= steps]
    grid = [(b, g, sp, 4, st) for b in (16, 32, 64) for g in (1, 2) for sp in (2, 4, 8)
            for st in (2, 3)]  # fmt: skip
    configs = [(*c, 3) for c in grid if c[1] * c[2] <= steps]
    configs += [(b, 1, sp, 4, 3, 0) for b in (32, 64) for sp in (4, 8)]
    return configs


def _configs(tokens, in_f, explore, modes):
    if modes == ["wide"]:
        return wide_candidates(tokens, in_f)
    if modes == ["regs"]:
        return regs_candidates(tokens)
    if modes == ["deep"]:
        return deep_candidates(tokens, in_f)
    if modes == ["tc1"]:
        return tc1_candidates(tokens, in_f)
    if modes == ["m7"]:
        return [c for c in mode7_candidates(tokens) if c[1] * c[2] <= in_f // 64]
    if modes == ["prefetch"]:
        return [c for c in prefetch_candidates(tokens) if c[1] * c[2] <= in_f // 64]
    configs = [] if modes == [6] else candidates(tokens, in_f, explore)
    if 6 in modes and tokens > 1:
        configs += mode6_candidates(tokens, in_f)
    return configs


def tune(shapes=SHAPES, tokens_list=TOKENS, rank=16, verbose=True, explore=False, modes=(),
         bank=0, workers=12):  # fmt: skip
    """Best ``(block_p, gps, split, warps, stages, MODE)`` per ``(out, in, per, tokens)``,
    with LoRA (one adapter, or a bank of ``bank`` adapters read through an index)."""
    modes = list(modes)
    if workers > 1:  # compiled kernels do not depend on the shape: compile on the first
        jobs = []
        for tokens in tokens_list:
            configs = _configs(tokens, shapes[0][1], explore, modes)
            chunk = max(1, -(-len(configs) // workers))
            jobs += [(shapes[0], tokens, rank, bank, configs[i : i + chunk])
                     for i in range(0, len(configs), chunk)]  # fmt: skip
        precompile(jobs, workers)
    best = {}
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        W = hqqlora.dequantize(layer).double()
        _, per = layout.packing_bits
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            A, B, s, index = _adapters(in_f, out_f, rank, bank, tokens)
            ref = _reference(x, W, A, B, index)
            key = (out_f, in_f, per, tokens)
            results = []
            configs = _configs(tokens, in_f, explore, modes)
            if key in _decode.TUNED:
                configs.append(_decode.TUNED[key])
            saved = _decode.TUNED.pop(key, None)
            configs.append(_decode.decode_config(out_f, in_f, per, 64, tokens))
            for config in configs:
                _decode.TUNED[key] = config

                def run(x=x, A=A, B=B, s=s, index=index):
                    return _decode.lora_decode(
                        x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s, index=index
                    )

                try:
                    err = ((run().double() - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        print(f"{key} {config}: wrong result (rel err {err:.1e})")
                        continue
                    # A CUDA graph of the call: kernel time without the host's launch time.
                    us = 1e3 * triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
                except Exception as exc:  # a configuration that does not compile or fit
                    print(f"{key} {config}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                results.append((us, config))
            if results:
                results.sort()
                # The best configuration without programmatic dependent launch, for comparison.
                _decode.TUNED[key] = results[0][1]
                _decode.PDL = False
                no_pdl = 1e3 * triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
                _decode.PDL = True
            _decode.TUNED.pop(key, None)
            if saved is not None:
                _decode.TUNED[key] = saved
            if results:
                best[key] = results[0][1]
                if verbose:
                    print(f"{key}: best {results[0][0]:.1f} us {results[0][1]} "
                          f"(without PDL {no_pdl:.1f} us)", flush=True)  # fmt: skip
                    # Best three per MODE (and per PREFETCH, where configurations set it).
                    groups = sorted({(c[5], c[7] if len(c) > 7 else -1) for _, c in results})
                    for mode, pf in groups:
                        top = [(round(us, 1), c) for us, c in results
                               if c[5] == mode and (c[7] if len(c) > 7 else -1) == pf][:3]  # fmt: skip
                        print(f"    MODE {mode}{'' if pf < 0 else f' PREFETCH {pf}'}: {top}")
    return best


GLUON_STAGES = (3, 4)
"""cp.async stages the Gluon sweep tries (``--stages``)."""

GLUON_WARPS = (8,)
"""Warps the Gluon sweep tries (``--warps``); a program takes a multiple of 8 packed rows a
warp (4 warps: one warpgroup, 32 or 64 packed rows)."""


def gluon_candidates(out_f, in_f, tokens):
    """Gluon base kernel (MODE 8) launches: packed rows a program, splits, warps, stages."""
    steps = in_f // 64
    out = []
    for warps in GLUON_WARPS:
        for block_p in (32, 64, 128):
            if block_p % (8 * warps) or block_p > 16 * warps:
                continue
            for split in (1, 2, 4, 8, 16):
                programs = out_f // 2 // block_p * split
                if steps % split or steps // split < 2 or not 32 <= programs <= 1024:
                    continue
                for stages in GLUON_STAGES:
                    out.append((block_p, split, warps, stages))
    return out


def _gluon_table(bank, tokens):
    """The table MODE 8 reads its launch from: TUNED_GATHER for a bank of several
    adapters above 16 rows, TUNED_GLUON otherwise."""
    return _decode.TUNED_GATHER if bank > 1 and tokens > _decode.DOT_ROWS else _decode.TUNED_GLUON


def _warm_gluon(job):
    """Compiles the Gluon kernel's configurations in a worker (see :func:`_warm`)."""
    (out_f, in_f), tokens, rank, bank, configs = job
    torch.manual_seed(0)
    layer = make_hqq_layer(in_f, out_f, device="cuda")
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    A, B, s, index = _adapters(in_f, out_f, rank, bank, tokens)
    for config in configs:
        _gluon_table(bank, tokens)[(out_f, in_f, tokens)] = config
        with contextlib.suppress(Exception):
            _decode.lora_decode(x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s,
                                index=index)  # fmt: skip
    torch.cuda.synchronize()


def tune_gluon(shapes=SHAPES, tokens_list=TOKENS, rank=16, bank=0, workers=12):
    """Best Gluon base kernel launch per ``(out, in, tokens)`` beside the Triton modes'
    tuned time (the same call with ``_decode.GLUON`` off), LoRA as :func:`tune` (with a
    bank of several adapters above 16 rows, entries of ``TUNED_GATHER``)."""
    import concurrent.futures
    import multiprocessing

    jobs = []
    for shape in shapes:
        for tokens in tokens_list:
            configs = gluon_candidates(*shape, tokens)
            jobs += [(shape, tokens, rank, bank, configs[i : i + 2])
                     for i in range(0, len(configs), 2)]  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_warm_gluon, jobs))
    best = {}
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        W = hqqlora.dequantize(layer).double()
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            A, B, s, index = _adapters(in_f, out_f, rank, bank, tokens)
            ref = _reference(x, W, A, B, index)
            key = (out_f, in_f, tokens)
            table = _gluon_table(bank, tokens)

            def run(x=x, A=A, B=B, s=s, index=index):
                return _decode.lora_decode(
                    x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s, index=index
                )

            _decode.GLUON = False
            triton_us = 1e3 * triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
            _decode.GLUON = True
            results = []
            for config in gluon_candidates(out_f, in_f, tokens):
                table[key] = config
                try:
                    err = ((run().double() - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        print(f"{key} {config}: wrong result (rel err {err:.1e})")
                        continue
                    us = 1e3 * triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
                except Exception as exc:
                    print(f"{key} {config}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                results.append((us, err, config))
            table.pop(key, None)
            results.sort()
            top = [(round(us, 1), c) for us, _, c in results[:4]]
            print(f"{key}: Triton modes {triton_us:.1f} us; Gluon best {top} "
                  f"(rel err {results[0][1]:.1e})" if results else f"{key}: no Gluon result",
                  flush=True)  # fmt: skip
            if results:
                best[key] = results[0][2] if results[0][0] < triton_us else None
    return best


def kernel_table(fn):
    """Each kernel's GPU time per call (µs, names cut short), from the profiler."""
    from bench_decode import kernel_us

    return {name[:24]: round(us, 2) for name, us in kernel_us(fn).items()}


def profile_best(shapes, tokens_list):
    """GPU time (profiler: the sum of kernel times) and CUDA-graph replay time of gemlite's
    base and of our LoRA layer, with the tuned configurations. With programmatic dependent
    launch the main kernel starts before the shrink kernel ends, so the sum of kernel
    times counts the overlap twice: the replay time is the figure to compare."""
    from bench_decode import gemlite_of, gpu_us, graphed, rel, wall_us

    for out_f, in_f in shapes:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        gl = gemlite_of(layer)
        A = torch.randn(16, in_f, device="cuda") / in_f**0.5
        B = torch.randn(out_f, 16, device="cuda") * 0.01
        p = {"lora_A": A, "lora_B": B, "scaling": torch.tensor(1.0, device="cuda")}
        W = hqqlora.dequantize(layer).double()
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():

                def ours(x=x):
                    return hqqlora.apply_lora(layer, p, x)

                def base(x=x):
                    return gl(x)

                ref = x.double() @ W.T + (x.double() @ A.double().T) @ B.double().T
                err = rel(ours(), ref)
                ours_gpu, ours_graph = gpu_us(ours), wall_us(graphed(ours)[0])
                per_kernel = kernel_table(ours)
                if gl is not None:
                    base_gpu, base_graph = gpu_us(base), wall_us(graphed(base)[0])
                    base_err = rel(base(), x.double() @ W.T)
                else:
                    base_gpu = base_graph = base_err = float("nan")
            print(
                f"{out_f}x{in_f} tokens {tokens}: ours LoRA fp32 {ours_gpu:.1f} us GPU, "
                f"{ours_graph:.1f} us graph replay (rel err {err:.1e}); gemlite base "
                f"{base_gpu:.1f} us GPU, {base_graph:.1f} us graph (rel err {base_err:.1e}): "
                f"{ours_gpu / base_gpu:.2f}x GPU, {ours_graph / base_graph:.2f}x graph; "
                f"kernels {per_kernel}",
                flush=True,
            )


def breakdown(shapes, tokens_list, rank=16):
    """Each kernel's GPU time (profiler, programmatic dependent launch off) of the base
    alone, with one adapter and with a bank of 64 (one per row), at the tuned
    configurations."""
    from bench_decode import kernel_us

    pdl, _decode.PDL = _decode.PDL, False
    programs = _decode.SHRINK_PROGRAMS
    for out_f, in_f in shapes:
        layer = make_hqq_layer(in_f, out_f, device="cuda")
        layout = quant_layout(layer)
        W_q, scale, zero = quant_tensors(layer)
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            for bank, shrink in ((None, programs), (0, programs), (64, programs), (64, 1024)):
                _decode.SHRINK_PROGRAMS = shrink
                if bank is None:
                    kw = {}
                else:
                    A, B, s, index = _adapters(in_f, out_f, rank, bank, tokens)
                    kw = {"lora_A": A, "lora_B": B, "scaling": s, "index": index}
                times = kernel_us(
                    lambda x=x, kw=kw: _decode.lora_decode(x, W_q, scale, zero, layout, **kw)
                )
                what = "base" if bank is None else ("1 adapter" if bank == 0 else "64 adapters")
                times = {k[:20]: round(v, 1) for k, v in times.items()}
                print(
                    f"{out_f}x{in_f} tokens {tokens} {what} (shrink {shrink}): {times}", flush=True
                )
    _decode.PDL, _decode.SHRINK_PROGRAMS = pdl, programs


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="4096² and 14336×4096, 1 and 16 tokens"
    )
    parser.add_argument("--explore", action="store_true", help="a wider grid")
    parser.add_argument("--profile-only", action="store_true", help="no tuning: TUNED as is")
    parser.add_argument("--tokens", type=int, nargs="*", help="these token counts only")
    parser.add_argument(
        "--modes",
        nargs="*",
        default=[],
        help="6: MODE 6's grid too; wide: few splits only; deep: MODE 4 with long K steps "
        "(one row); tc1: the tensor-core modes at one row; regs: registers capped; "
        "prefetch: PREFETCH 0-2 around the tuned shapes; m7: MODE 7 against 5 and 6; m8: "
        "the Gluon base kernel (MODE 8) against the tuned Triton modes",
    )
    parser.add_argument("--term-floats", type=int, help="_decode.TERM_FLOATS for this run")
    parser.add_argument("--shape", type=int, nargs=2, help="this (out, in) only")
    parser.add_argument("--bank", type=int, default=0, help="a bank of N adapters, one per row")
    parser.add_argument("--workers", type=int, default=12, help="compile processes")
    parser.add_argument("--stages", type=int, nargs="+", help="m8: the Gluon kernel's stages")
    parser.add_argument("--warps", type=int, nargs="+", help="m8: the Gluon kernel's warps")
    parser.add_argument(
        "--gather-side", type=int, choices=(0, 1, 2), help="m8: _decode.GATHER_SIDE for this run"
    )
    parser.add_argument("--no-profile", action="store_true", help="tune only")
    parser.add_argument("--breakdown", action="store_true", help="per-kernel times after tuning")
    args = parser.parse_args()
    print(environment("cuda"))
    shapes, tokens = ([(4096, 4096), (14336, 4096)], [1, 16]) if args.quick else (SHAPES, TOKENS)
    tokens = args.tokens or tokens
    if args.shape:
        shapes = [tuple(args.shape)]
    if args.term_floats:
        _decode.TERM_FLOATS = args.term_floats
    if args.profile_only:
        profile_best(shapes, tokens)
        return
    if "m8" in args.modes:
        global GLUON_STAGES, GLUON_WARPS
        GLUON_STAGES = tuple(args.stages or GLUON_STAGES)
        GLUON_WARPS = tuple(args.warps or GLUON_WARPS)
        if args.gather_side is not None:
            _decode.GATHER_SIDE = args.gather_side
        best = tune_gluon(shapes, tokens, bank=args.bank, workers=args.workers)
        for name in ("TUNED_GLUON", "TUNED_GATHER"):
            entries = {
                key: config
                for key, config in best.items()
                if _gluon_table(args.bank, key[2]) is getattr(_decode, name)
            }
            if entries:
                print(f"{name} = {{")
                for key, config in sorted(entries.items()):
                    print(f"    {key}: {config},")
                print("}", flush=True)
        return
    best = tune(
        shapes,
        tokens,
        explore=args.explore,
        modes=[int(m) if m.isdigit() else m for m in args.modes],
        bank=args.bank,
        workers=args.workers,
    )
    print("TUNED = {")
    for key, config in sorted(best.items()):
        print(f"    {key}: {config},")
    print("}", flush=True)
    _decode.TUNED.update(best)
    if args.breakdown:
        breakdown(shapes, tokens)
    if not args.no_profile:
        profile_best(shapes, tokens)


if __name__ == "__main__":
    main()
