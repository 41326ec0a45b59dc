# %% [markdown]
# # Composing LoRA adapters on a quantized layer
#
# Two random adapters (stand-ins for trained ones) on one 4-bit HQQ layer are combined with every method of
# `hqqlora.combine` (PEFT's `add_weighted_adapter` methods). For each we print how far the
# combined adapter's layer output is from the dense weighted sum
# `base(x) + Σᵢ wᵢ·x @ ΔWᵢᵀ` (relative to the size of the adapters' term), and the rank
# it needs. Runs in a few seconds on a CPU.

# %%
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

import hqqlora

torch.manual_seed(0)
linear = torch.nn.Linear(128, 96)
base = HQQLinear(
    linear, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu"
)

gen = torch.Generator().manual_seed(0)
math_adapter = hqqlora.init_lora(base, r=8, lora_alpha=16, init_lora_weights=False, generator=gen)
code_adapter = hqqlora.init_lora(base, r=8, lora_alpha=8, init_lora_weights=False, generator=gen)
weights = [0.7, 0.5]
x = torch.randn(32, 128, generator=gen)

# %% [markdown]
# The reference: the base output plus the exact weighted sum of the two updates, in float64.

# %%
dense = sum(
    w * hqqlora.delta_weight(p).double()
    for w, p in zip(weights, (math_adapter, code_adapter), strict=True)
)
reference = hqqlora.base_forward(base, x).double() + x.double() @ dense.T


def relative_error(params):
    out = hqqlora.apply_lora(base, params, x).double()
    return (
        (out - reference).norm() / (reference - hqqlora.base_forward(base, x).double()).norm()
    ).item()


# %% [markdown]
# Every method; the pruning methods keep 70% of the entries, the SVD methods use rank 8.
# `return_info=True` also reports the distance of the combined update to the dense sum and,
# for SVD methods, what the truncation dropped.

# %%
print(f"{'method':<22}{'rank':>5}{'output rel. error':>20}{'ΔW rel. error':>16}{'SVD tail':>10}")
METHODS = (
    "cat", "linear", "svd",
    "ties", "ties_svd", "dare_linear", "dare_linear_svd",
    "dare_ties", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
)  # fmt: skip
for method in METHODS:
    options = {}
    if method.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        options["density"] = 0.7
    if method.endswith("svd"):
        options["rank"] = 8
    combined, info = hqqlora.combine(
        [math_adapter, code_adapter],
        weights,
        method,
        generator=torch.Generator().manual_seed(1),
        return_info=True,
        **options,
    )
    print(
        f"{method:<22}{combined['lora_A'].shape[0]:>5}{relative_error(combined):>20.2e}"
        f"{info.rel_error.item():>16.2e}{info.truncation_error.item():>10.3f}"
    )

# %% [markdown]
# `add`, `scale` and `negate` are exact: `add` concatenates ranks, `scale` multiplies `lora_B`.
# Subtracting an adapter from a sum gives back (the update of) the other one.

# %%
total = hqqlora.add(hqqlora.scale(math_adapter, 0.7), hqqlora.scale(code_adapter, 0.5))
print("add(scale, scale):", f"{relative_error(total):.2e}")
only_code = hqqlora.add(total, hqqlora.negate(hqqlora.scale(math_adapter, 0.7)))
gap = (hqqlora.delta_weight(only_code) - 0.5 * hqqlora.delta_weight(code_adapter)).norm()
print("add(total, -math) - code:", f"{gap.item():.2e}")

# %% [markdown]
# The same calls work on whole-model dicts (module path -> adapter), module by module.

# %%
model_a = {"layers.0.q_proj": math_adapter, "layers.0.v_proj": code_adapter}
model_b = {"layers.0.q_proj": code_adapter}
mixed = hqqlora.combine([model_a, model_b], [1.0, -0.5], "svd", rank=4)
print({path: tuple(p["lora_A"].shape) for path, p in mixed.items()})
