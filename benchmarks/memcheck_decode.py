"""Out-of-bounds check of the decode kernels (CUDA): run under compute-sanitizer.

compute-sanitizer --tool memcheck --leak-check no python benchmarks/memcheck_decode.py
(``... memcheck_decode.py prefetch``: only the configurations that set PREFETCH, MODE 7's
among them; ``... gluon``: only MODE 8, the Gluon base kernel, 4-bit, on compute
capability 9.0)

Default and tuned configurations at 1-64 rows, 2 and 4 bits: the base alone, a bank with
DoRA, bias, rows without an adapter and rows past the bank, one adapter without an index,
rows that share one adapter (the one-dot path), and K loops of several steps at each
PREFETCH level.
"""

import sys

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

from hqqlora import _decode
from hqqlora._base import quant_layout, quant_tensors

# MODE 8: (rows, TUNED_GLUON entry, FINISH_ROWS[, GATHER_SIDE]); up to FINISH_ROWS rows
# finish in the Gluon kernel; above 16 rows a bank's rows gather several adapters, their
# kernels beside the Gluon kernel (GATHER_SIDE 1) or before it (0).
GLUON = (
    (1, (64, 4, 8, 3), 1),
    (1, (32, 16, 4, 3), 1),
    (2, (64, 16, 8, 4), 16),
    (5, (64, 2, 8, 4), 1),
    (16, (64, 8, 8, 3, 32), 1),
    (16, (64, 1, 8, 3), 16),
    (17, (32, 4, 4, 3, 16), 1, 1),
    (17, (32, 4, 4, 3, 16), 1, 0),
    (40, (64, 4, 8, 4), 1, 1),
    (64, (64, 16, 8, 3), 1, 1),
    (64, (64, 16, 8, 3), 1, 0),
    # Finished in the Gluon kernel above one row (one adapter, a bank of 3).
    (5, (64, 2, 8, 4), 16),
    (16, (128, 8, 8, 3), 16),
)
torch.manual_seed(0)
gluon = sys.argv[1:] == ["gluon"]
for nbits in (4,) if gluon else (4, 2):
    lin = torch.nn.Linear(1024, 768)
    layer = HQQLinear(
        lin,
        BaseQuantizeConfig(nbits=nbits, group_size=64, axis=1),
        compute_dtype=torch.bfloat16,
        device="cuda",
    )
    layout = quant_layout(layer)
    W_q, scale, zero = quant_tensors(layer)
    per = layout.packing_bits[1]
    n, r = 3, 16
    A, B = torch.randn(n, r, 1024, device="cuda") * 0.1, torch.randn(n, 768, r, device="cuda") * 0.1
    s, is_dora = (
        torch.tensor([0.5, 2.0, 1.0], device="cuda"),
        torch.tensor([True, False, True], device="cuda"),
    )
    mag, norm = torch.rand(n, 768, device="cuda") + 0.5, torch.rand(n, 768, device="cuda") + 0.5
    plan = [(rows, None, (entry, finish, *side)) for rows, entry, finish, *side in GLUON]
    plan = plan if gluon else []
    for rows, config, tuned_gluon in plan or [(rows, config, None) for rows, config in (
        (1, None),
        (1, (32, 4, 16, 4, 1, 4)),
        (1, (2, 4, 1, 2, 1, 4)),
        (2, None),
        (16, None),
        (16, (32, 1, 16, 4, 2, 5)),
        (16, (8, 2, 1, 4, 3, 6)),
        (17, None),
        (64, None),
        (64, (64, 1, 4, 8, 3, 6)),
        (64, (16, 1, 4, 4, 3, 6)),
        # Several K steps a program at each PREFETCH level (the last step loads itself again).
        *((1, (16, 4, 2, 4, 1, 4, 0, p)) for p in (0, 1, 2)),
        *((16, (32, 1, 4, 4, 2, 5, 0, p)) for p in (0, 1, 2)),
        *((64, (64, 1, 2, 8, 3, 6, 0, p)) for p in (0, 1, 2)),
        *((rows, (64, 1, 2, 8, 3, 7, 0, p)) for rows in (17, 64) for p in (1, 2)),
    )]:  # fmt: skip
        if sys.argv[1:] == ["prefetch"] and (config is None or len(config) < 8):
            continue
        _decode.TUNED.clear()
        _decode.TUNED_GLUON.clear()
        _decode.TUNED_GATHER.clear()
        if config is not None:
            _decode.TUNED[(768, 1024, per, rows)] = config
        if tuned_gluon is not None:
            _decode.TUNED_GLUON[(768, 1024, rows)], _decode.FINISH_ROWS = tuned_gluon[:2]
            _decode.GATHER_SIDE = tuned_gluon[2] if len(tuned_gluon) > 2 else 2
            _decode.TUNED_GATHER[(768, 1024, rows)] = tuned_gluon[0][:4]
        else:
            _decode.TUNED_GLUON[(768, 1024, rows)] = None  # the Triton modes
            _decode.TUNED_GATHER[(768, 1024, rows)] = None
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        idx = torch.arange(rows, device="cuda") % 5 - 1  # -1, 0, 1, 2, 3 (past the bank)
        for kw in (
            {},
            {
                "lora_A": A,
                "lora_B": B,
                "scaling": s,
                "index": idx,
                "magnitude": mag,
                "weight_norm": norm,
                "is_dora": is_dora,
                "bias": layer.bias,
            },
            {"lora_A": A[0], "lora_B": B[0], "scaling": s[:1]},
            {
                "lora_A": A,
                "lora_B": B,
                "scaling": s,
                "bias": layer.bias,
                "index": torch.where(idx == 3, -1, 1),
            },
            # Rank 9 (16 rank slots: the rank masks; at 64 rows the last rank slice of the
            # bank's shrink is partial).
            {"lora_A": A[:, :9].contiguous(), "lora_B": B[..., :9].contiguous(), "scaling": s,
             "index": idx},
            # Rank 40 (64 rank slots), one adapter and a bank.
            {"lora_A": A[0].repeat(3, 1)[:40].contiguous(),
             "lora_B": B[0].repeat(1, 3)[:, :40].contiguous(), "scaling": s[:1]},
            {"lora_A": A.repeat(1, 3, 1)[:, :40].contiguous(),
             "lora_B": B.repeat(1, 1, 3)[..., :40].contiguous(), "scaling": s, "index": idx},
        ):  # fmt: skip
            _decode.lora_decode(x, W_q, scale, zero, layout, **kw)
        torch.cuda.synchronize()
        print(nbits, rows, config or tuned_gluon, "ok", flush=True)
