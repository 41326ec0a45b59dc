"""The tensor-core GEMV (``_decode.GEMV``) at one token: where its time goes, and its launch
(CUDA).

python benchmarks/ab_gemv.py --rounds 5 --sweep

For each shape of ``_decode.TUNED_GEMV`` (4-bit g64, bf16, one token), in turn ``--rounds``
times (CUDA-graph µs, ``do_bench_cudagraph``, the median and the spread) with the error of
each against float64:

- gemlite's A16Wn base (as HQQ's backend runs it);
- the base term alone (``base_forward``), LoRA r=16 and DoRA with a held norm (float32
  adapters, ``apply_lora``), with ``GEMV`` off and on; on, LoRA again with the dependent
  launch off (``PDL``), and the GEMV's K loop alone as its variant runs it
  (``benchmarks/variants/gemv_mma.py``, the table's launch).

So the adapter's share on each path is the LoRA arm less the base arm of the same path.
``--sweep`` then times LoRA through the library at every launch that ``_gluon_gemv.fits``
(one round each; the best three again in turn with ``GEMV`` off, ``--rounds`` times).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

import torch
import triton.testing
from bench_decode import adapter, gemlite_of, reference, rel
from common import environment, make_hqq_layer

import hqqlora
from hqqlora import _decode, _gluon_gemv
from hqqlora._base import quant_tensors

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "variants"))


def _us(fn) -> float:
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def _err(y, ref) -> float:
    return rel(y.reshape(ref.shape), ref)


def _switched(fn, **flags):
    """``fn`` with ``_decode``'s module flags set while it runs (and while it is captured)."""

    def run():
        saved = {k: getattr(_decode, k) for k in flags}
        for k, v in flags.items():
            setattr(_decode, k, v)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                setattr(_decode, k, v)

    return run


def _in_turn(calls, refs, rounds):
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            times[k].append(_us(fn))
    for k, fn in calls.items():
        ts = times[k]
        print(
            f"| {k} | {statistics.median(ts):.2f} | {min(ts):.2f}–{max(ts):.2f} "
            f"| {_err(fn(), refs[k]):.1e} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    print(environment("cuda"))
    from gemv_mma import gemv as variant

    for n_out, k_in, rows in sorted(_decode.TUNED_GEMV):
        torch.manual_seed(0)
        layer = make_hqq_layer(k_in, n_out, device="cuda")
        W_q, scale, zero = quant_tensors(layer)
        x = torch.randn(rows, k_in, device="cuda", dtype=torch.bfloat16)
        lora = adapter(layer)
        dora = adapter(layer, dora=True)
        norm = hqqlora.dora_weight_norm(layer, dora)
        base_ref, lora_ref, dora_ref = (reference(layer, x, p) for p in (None, lora, dora))
        entry = _decode.TUNED_GEMV[(n_out, k_in, rows)]
        print(f"\n{n_out}x{k_in}, {rows} row(s), TUNED_GEMV {entry}")
        print("| path | µs | spread | error |\n|---|---|---|---|")
        calls, refs = {}, {}
        gl_ = gemlite_of(layer)
        if gl_ is not None:
            calls["gemlite base"], refs["gemlite base"] = (lambda: gl_(x)), base_ref
        for on in (False, True):
            tag = "GEMV on" if on else "GEMV off"
            calls[f"{tag}: base"] = _switched(lambda: hqqlora.base_forward(layer, x), GEMV=on)
            calls[f"{tag}: LoRA"] = _switched(lambda: hqqlora.apply_lora(layer, lora, x), GEMV=on)
            calls[f"{tag}: DoRA held"] = _switched(
                lambda: hqqlora.apply_lora(layer, dora, x, weight_norm=norm), GEMV=on
            )
            refs.update({f"{tag}: base": base_ref, f"{tag}: LoRA": lora_ref})
            refs[f"{tag}: DoRA held"] = dora_ref
        calls["GEMV on: LoRA, PDL off"] = _switched(
            lambda: hqqlora.apply_lora(layer, lora, x), GEMV=True, PDL=False
        )
        refs["GEMV on: LoRA, PDL off"] = lora_ref
        calls["variant K loop (base)"] = lambda: variant(
            x, W_q, scale, zero, n_out, k_in, (*entry, False)
        )
        refs["variant K loop (base)"] = base_ref
        with torch.no_grad():
            _in_turn(calls, refs, args.rounds)
            if args.sweep:
                _sweep(layer, x, lora, lora_ref, (n_out, k_in, rows), args.rounds)


def _sweep(layer, x, lora, ref, key, rounds) -> None:
    n_out, k_in, rows = key
    saved = _decode.TUNED_GEMV[key]
    results = []
    for warps, mult, split in itertools.product((1, 2, 4, 8), (8, 16, 32), (2, 4, 8, 16, 32)):
        cfg = (mult * warps, split, warps)
        if not _gluon_gemv.fits(rows, n_out, k_in, *cfg):
            continue
        if not 128 <= n_out // 2 // cfg[0] * split <= 4096:
            continue
        _decode.TUNED_GEMV[key] = cfg
        fn = _switched(lambda: hqqlora.apply_lora(layer, lora, x), GEMV=True)
        try:
            results.append((_us(fn), cfg, _err(fn(), ref)))
        except Exception as exc:  # a launch the compiler refuses: say so, go on
            print(f"{cfg}: {type(exc).__name__}: {str(exc)[:160]}")
    _decode.TUNED_GEMV[key] = saved
    results.sort()
    print("\nsweep, LoRA, one round each (block_p, split, warps): µs, error")
    for us, cfg, err in results[:6]:
        print(f"  {cfg}: {us:.2f} ({err:.1e})")
    calls, refs = {}, {}
    for _, cfg, _ in results[:3]:

        def run(cfg=cfg):
            _decode.TUNED_GEMV[key] = cfg
            try:
                return hqqlora.apply_lora(layer, lora, x)
            finally:
                _decode.TUNED_GEMV[key] = saved

        calls[f"GEMV {cfg}: LoRA"] = _switched(run, GEMV=True)
        refs[f"GEMV {cfg}: LoRA"] = ref
    calls["GEMV off: LoRA"] = _switched(lambda: hqqlora.apply_lora(layer, lora, x), GEMV=False)
    refs["GEMV off: LoRA"] = ref
    print("| path | µs | spread | error |\n|---|---|---|---|")
    _in_turn(calls, refs, rounds)


if __name__ == "__main__":
    main()
