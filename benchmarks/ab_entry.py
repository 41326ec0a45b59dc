"""A ``TUNED`` entry of hqqlora._decode against ``decode_config``'s rule at its shape (CUDA).

python benchmarks/ab_entry.py --shape 1024 4096 --rows 1 --rounds 5

4-bit g64, LoRA r=16 float32, one adapter (bank 0) and a bank of one read through an index
(bank 1): CUDA-graph time per call (µs, ``do_bench_cudagraph``) of ``lora_decode`` with the
table's entry and with the rule's launch, in turn, ``--rounds`` times (the median and the
spread), and the error of each against float64. Both arms are ``TUNED`` entries, so a shape
whose rows the Gluon kernel would take without the entry (no ``TUNED_GLUON`` key, 2–64 rows)
is not compared with what the library does there; one row of a shape that ``TUNED_GLUON``
maps to ``None`` (as 1024×4096) is.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton.testing
from common import environment, make_hqq_layer
from tune_decode import _adapters, _reference

import hqqlora
from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=2, required=True, help="out in")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    out_f, in_f = args.shape
    key = (out_f, in_f, 2, args.rows)
    if args.rounds < 1 or key not in _decode.TUNED:
        parser.error(f"--rounds at least 1, and a TUNED entry for {key}")
    print(environment("cuda"))
    entry = _decode.TUNED.pop(key)
    rule = _decode.decode_config(out_f, in_f, 2, 64, args.rows)
    _decode.TUNED[key] = entry
    print(f"{key}: entry {entry}, rule {rule}; graph µs, median of {args.rounds} rounds (spread)")
    torch.manual_seed(0)
    layer = make_hqq_layer(in_f, out_f, device="cuda")
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    W = hqqlora.dequantize(layer).double()
    x = torch.randn(args.rows, in_f, device="cuda", dtype=torch.bfloat16)
    for bank in (0, 1):
        A, B, s, index = _adapters(in_f, out_f, 16, bank, args.rows)
        ref = _reference(x, W, A, B, index)

        def run(A=A, B=B, s=s, index=index):
            return _decode.lora_decode(
                x, W_q, scale, zero, layout, lora_A=A, lora_B=B, scaling=s, index=index
            )

        times, errs = {"rule": [], "entry": []}, {}
        for _ in range(args.rounds):
            for name, config in (("rule", rule), ("entry", entry)):
                _decode.TUNED[key] = config
                errs[name] = ((run().double() - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median")
                times[name].append(1e3 * ms)
        _decode.TUNED[key] = entry
        cells = "; ".join(
            f"{name} {statistics.median(ts):.2f} ({min(ts):.2f}–{max(ts):.2f}), err {errs[name]:.2e}"
            for name, ts in times.items()
        )
        print(f"bank {bank}: {cells}", flush=True)


if __name__ == "__main__":
    main()
