"""The prefill kernels in Triton's interpreter, on the CPU (no GPU needed).

Skipped where Triton is not installed (the CPU build of torch brings none:
``pip install triton==3.6.0`` adds it). Triton's interpreter emulates
bf16 badly, so these run in float16. A subprocess: the interpreter is chosen when the
kernels are defined (``TRITON_INTERPRET=1`` before ``hqqlora._prefill`` is imported).

The interpreter computes every ``tl.dot`` in float32 whatever its ``input_precision``;
the prelude makes it round as a GPU does (TF32: 10-bit mantissas; TF32x3: a TF32 head
and tail of each operand, three products), so a kernel that asked for plain TF32 fails
here as it would lose precision on a GPU.

Each output is checked elementwise against the float64 value computed from the same
float16 base output: at most half a unit in the last place of float16 (the one
rounding) plus ``2⁻¹⁸`` of the sum of the absolute terms (float32 accumulation, with
room; TF32's ``2⁻¹¹`` does not fit).
"""

import textwrap

import pytest
from helpers import TF32_DOTS, interpret

pytest.importorskip("triton")

PRELUDE = TF32_DOTS + textwrap.dedent(
    r"""
    import sys
    sys.path.insert(0, "tests")
    from hqqlora import _prefill

    def ulp16(v):
        _, e = torch.frexp(v)
        return torch.clamp(torch.ldexp(torch.ones_like(v), e - 11), min=2.0**-24)

    def check(got, ref, bound, what, failures):
        # half an ulp of float16 at the larger of the two, plus float32 accumulation
        big = torch.maximum(ref.abs(), got.double().abs())
        err = (got.double() - ref).abs()
        ok = err <= 0.5 * ulp16(big) + 2.0**-18 * bound
        if not bool(ok.all()):
            failures.append((*what, float(err.max()), int((~ok).sum())))

    def reference(x, res, index, A, B, s, mag, norm, is_dora, bias):
        # float64 from the same float16 base output; also the sum of absolute terms.
        refs, bounds = [], []
        b = 0 if bias is None else bias.double()
        for i, k in enumerate(index.tolist()):
            r = res[i].double()
            if k < 0:
                refs.append(r)
                bounds.append(r.abs())
                continue
            xa, Aa, Ba = x[i].double(), A[k].double(), B[k].double()
            term = s[k].double() * (xa @ Aa.T) @ Ba.T
            absterm = s[k].double().abs() * (xa.abs() @ Aa.abs().T) @ Ba.abs().T
            if is_dora is not None and bool(is_dora[k]):
                c = mag[k].double() / norm[k].double()
                refs.append(c * (r - b + term) + b)
                bounds.append(c.abs() * (r.abs() + abs(b) + absterm) + abs(b))
            else:
                refs.append(r + term)
                bounds.append(r.abs() + absterm)
        return torch.stack(refs), torch.stack(bounds)
    """
)

KERNELS = PRELUDE + textwrap.dedent(
    r"""
    import itertools

    def fenced(bank, dtype):
        # The bank as a view between two NaN entries: a read outside it shows as NaN.
        buf = torch.full((bank.shape[0] + 2, *bank.shape[1:]), float("nan"), dtype=dtype)
        buf[1:-1] = bank
        return buf[1:-1]

    torch.manual_seed(0)
    failures = []
    shapes = ((64, 64), (96, 80), (320, 72), (136, 320))  # (in, out), most not multiples of a tile
    layouts = ((1, 65, [2]), (2, 100, [1, -1]), (3, 70, [0, 0, -1]), (2, 150, [2, 2]))
    # (DoRA bank, bias): a DoRA bank also holds a LoRA entry, which covers LoRA without bias.
    cases = itertools.product(shapes, (1, 8, 16, 24), (torch.float32, torch.float16),
                              ((False, True), (True, False), (True, True)))
    for i_case, ((k_in, n_out), r, dtype, (dora, has_bias)) in enumerate(cases):
        batch, L, idx = layouts[i_case % len(layouts)]
        # One case in three: small tiles, so the rank takes several tiles (r = 24), `in`
        # several shrink splits (the last one partial), and tiles end inside the shapes.
        _prefill.TUNED.clear()
        if i_case % 3 == 1 and L < 150:
            _prefill.TUNED[(L, r, k_in, n_out)] = (16, 16, 16, 4, 2, 16, 32, 4, 2)
        n = 3
        A = fenced(torch.randn(n, r, k_in) / k_in**0.5, dtype)
        B = fenced(torch.randn(n, n_out, r) / r**0.5, dtype)
        s = torch.tensor([0.5, 2.0, 1.25])
        x = torch.randn(batch, L, k_in).half()
        res = torch.randn(batch, L, n_out).half()
        bias = torch.randn(n_out).half() if has_bias else None
        mag = norm = is_dora = None
        if dora:  # a mixed bank: entries 0 and 2 DoRA, 1 LoRA
            mag = fenced(torch.rand(n, n_out) + 0.5, dtype)
            norm = fenced(torch.rand(n, n_out) + 0.5, dtype)
            is_dora = torch.tensor([True, False, True])
        index = torch.tensor(idx)
        got = _prefill.lora_prefill(x, res, index, lora_A=A, lora_B=B, scaling=s,
                                    magnitude=mag, weight_norm=norm, is_dora=is_dora, bias=bias)
        ref, bound = reference(x, res, index, A, B, s, mag, norm, is_dora, bias)
        assert got.shape == res.shape and got.dtype == torch.float16
        check(got, ref, bound, (k_in, n_out, r, str(dtype), dora, has_bias, batch, L), failures)
    print("FAILURES", failures)
    assert not failures
    """
)


def test_prefill_kernels_in_the_interpreter_match_float64():
    interpret(KERNELS)


# An index outside [-1, n) (past the bank, far past it): a NaN row, and no read outside the
# bank (the interpreter reads raw memory, so such a read crashes or gives garbage there).
OUT_OF_RANGE = PRELUDE + textwrap.dedent(
    r"""
    torch.manual_seed(0)
    n, r, k_in, n_out, L = 2, 4, 64, 48, 40
    A, B = torch.randn(n, r, k_in) * 0.1, torch.randn(n, n_out, r) * 0.1
    s, is_dora = torch.tensor([0.5, 2.0]), torch.tensor([True, False])
    mag, norm = torch.rand(n, n_out) + 0.5, torch.rand(n, n_out) + 0.5
    x, res = torch.randn(4, L, k_in).half(), torch.randn(4, L, n_out).half()
    bias = torch.randn(n_out).half()
    failures = []
    for big in (n, 2**40, -2):
        index = torch.tensor([0, big, 1, -1])
        got = _prefill.lora_prefill(x, res, index, lora_A=A, lora_B=B, scaling=s, magnitude=mag,
                                    weight_norm=norm, is_dora=is_dora, bias=bias)
        assert torch.isnan(got[1]).all(), big
        keep = torch.tensor([0, 2, 3])
        ref, bound = reference(x[keep], res[keep], index[keep], A, B, s, mag, norm, is_dora, bias)
        check(got[keep], ref, bound, ("out of range", big), failures)
    print("FAILURES", failures)
    assert not failures
    """
)


def test_index_outside_the_bank_gives_nan_rows_without_reading_outside():
    interpret(OUT_OF_RANGE)


# mixed_batch_indexed with the kernels reachable on the CPU: `is_cuda` says yes for CPU
# tensors, so the eligibility checks decide as on a GPU and the kernels run in the
# interpreter. Above the decode kernels' 64 tokens the prefill kernels take the call
# (LoRA and a mixed LoRA/DoRA bank, strided norms); at 64 tokens the decode kernels do;
# `exact=True`, a gradient wanted, autocast, or an x in another dtype: the dense path.
DISPATCH = PRELUDE + textwrap.dedent(
    r"""
    torch.Tensor.is_cuda = property(lambda self: self.device.type == "cpu")
    import hqqlora
    from hqqlora import _decode
    from helpers import make_layer, random_adapter

    taken = []
    for module, name in ((_prefill, "lora_prefill"), (_decode, "lora_decode")):
        def spy(*args, _real=getattr(module, name), _name=name, **kwargs):
            taken.append(_name)
            return _real(*args, **kwargs)
        setattr(module, name, spy)

    torch.manual_seed(0)
    layer = make_layer(96, 80, group_size=32, dtype=torch.float16)
    lora = random_adapter(layer, r=4, seed=1)
    dora = random_adapter(layer, r=6, dora=True, seed=2)
    failures = []
    for adapters in ({"a": lora}, {"a": lora, "b": dora}):
        bank = hqqlora.stack_adapters(adapters)
        has_dora = len(adapters) == 2
        norm = hqqlora.bank_weight_norm(layer, bank).t().contiguous().t() if has_dora else None
        index = torch.tensor([len(adapters) - 1, -1, 0])
        for tokens, path in ((30, "lora_prefill"), (21, "lora_decode")):
            x = torch.randn(3, tokens, 96).half()
            with torch.no_grad():
                taken.clear()
                got = hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=norm)
                assert taken == [path], (taken, path)
                if path == "lora_decode":
                    continue
                taken.clear()
                res = hqqlora.base_forward(layer, x)
                dense = hqqlora.mixed_batch_indexed(x, bank, index, base=layer,
                                                    weight_norm=norm, exact=True)
                assert taken == [], taken
            A, B, s = bank.lora_A, bank.lora_B, bank.scaling
            mag, is_dora = bank.magnitude, bank.is_dora if has_dora else None
            ref, bound = reference(x, res, index, A, B, s, mag, norm, is_dora, layer.bias)
            check(got, ref, bound, (len(adapters), tokens), failures)
            check(dense, ref, bound, (len(adapters), tokens, "dense"), failures)
    # Where the kernels do not apply: the dense path, with the same values.
    bank = hqqlora.stack_adapters({"a": lora, "b": dora})
    index = torch.tensor([1, -1, 0])
    x = torch.randn(3, 30, 96).half()
    with torch.no_grad():
        want = hqqlora.mixed_batch_indexed(x, bank, index, base=layer, exact=True)
    cases = {
        "grad": lambda: hqqlora.mixed_batch_indexed(x.clone().requires_grad_(), bank, index,
                                                    base=layer),
        "x float32": lambda: hqqlora.mixed_batch_indexed(x.float(), bank, index, base=layer),
        "float64 bank": lambda: hqqlora.mixed_batch_indexed(
            x, hqqlora.stack_adapters({"a": {k: v.double() for k, v in lora.items()}}),
            torch.tensor([0, -1, 0]), base=layer),
    }
    for name, call in cases.items():
        taken.clear()
        with torch.enable_grad() if name == "grad" else torch.no_grad():
            got = call()
        if taken:
            failures.append((name, taken))
        if name == "grad":
            got.float().sum().backward()
            assert torch.allclose(got.detach().double(), want.double(), atol=1e-2), name
    print("FAILURES", failures)
    assert not failures
    """
)


def test_mixed_batch_indexed_takes_the_prefill_kernels_above_64_tokens():
    interpret(DISPATCH)


# A bank built by hand (AdapterBank is a NamedTuple: `bank._replace(...)`) whose tensors do
# not agree: the kernels index them by the shapes of lora_A alone, so they read outside the
# shorter tensors or with the wrong rank stride and answer without an error, where the dense
# path stops. Every call refuses it with a ValueError, before any kernel runs.
MALFORMED_BANK = PRELUDE + textwrap.dedent(
    r"""
    torch.Tensor.is_cuda = property(lambda self: self.device.type == "cpu")
    import hqqlora
    from helpers import make_layer, random_adapter

    torch.manual_seed(0)
    layer = make_layer(96, 80, group_size=32, dtype=torch.float16)
    lora = random_adapter(layer, r=4, seed=1)
    bank = hqqlora.stack_adapters({"a": lora, "b": random_adapter(layer, r=4, seed=5)})
    dbank = hqqlora.stack_adapters({"a": lora, "d": random_adapter(layer, r=6, dora=True)})
    x = torch.randn(3, 30, 96).half()
    index = torch.tensor([1, -1, 0])
    broken = {
        "scaling short": bank._replace(scaling=bank.scaling[:1]),
        "lora_B short": bank._replace(lora_B=bank.lora_B[:1]),
        "lora_A rank short": bank._replace(lora_A=bank.lora_A[:, :2]),
        "lora_B rank short": bank._replace(lora_B=bank.lora_B[:, :, :2]),
        "lora_A 2-D": bank._replace(lora_A=bank.lora_A[0]),
        "is_dora short": dbank._replace(is_dora=dbank.is_dora[:1]),
        "magnitude short": dbank._replace(magnitude=dbank.magnitude[:1]),
        "dora flags short": dbank._replace(dora=dbank.dora[:1]),
        "names short": dbank._replace(names=dbank.names[:1]),
    }
    failures = []
    for name, b in broken.items():
        for exact in (False, True):
            try:
                with torch.no_grad():
                    hqqlora.mixed_batch_indexed(x, b, index, base=layer, exact=exact)
            except ValueError as e:
                if not str(e).startswith("Expected"):
                    failures.append((name, exact, str(e)))
            except Exception as e:
                failures.append((name, exact, type(e).__name__, str(e)[:80]))
            else:
                failures.append((name, exact, "no error"))
    print("FAILURES", failures)
    assert not failures
    """
)


def test_a_malformed_bank_is_refused_before_the_kernels_read_it():
    interpret(MALFORMED_BANK)


# Offsets into x, the base output and the output are row × width: 64 rows × 4096 tokens ×
# 14336 features is 3.8e9 elements, past int32. A test cannot hold such tensors, so it checks
# the arithmetic instead: every pointer step taken from the start of these tensors (the row
# offset, `flat * K` or `flat * N`) is computed in int64. (The other offsets are bounded: an
# adapter's own r × in or out × r, the shrink partials' split × tokens × r_pad below 1024 ×
# BLOCK_T × BLOCK_R since splits are only taken while programs × splits < 512.)
INT64_OFFSETS = PRELUDE + textwrap.dedent(
    r"""
    steps = []
    _real_addptr = _interp.InterpreterBuilder.create_addptr

    def _addptr(self, ptr, offset):
        steps.append((int(ptr.data.min()), int(ptr.data.max()), offset.data.dtype))
        return _real_addptr(self, ptr, offset)

    _interp.InterpreterBuilder.create_addptr = _addptr
    torch.manual_seed(0)
    n, r, k_in, n_out = 2, 4, 64, 48
    A, B = torch.randn(n, r, k_in) * 0.1, torch.randn(n, n_out, r) * 0.1
    s, is_dora = torch.tensor([0.5, 2.0]), torch.tensor([True, False])
    mag, norm = torch.rand(n, n_out) + 0.5, torch.rand(n, n_out) + 0.5
    x, res = torch.randn(3, 20, k_in).half(), torch.randn(3, 20, n_out).half()
    index = torch.tensor([0, 1, -1], dtype=torch.int32)
    got = _prefill.lora_prefill(x, res, index, lora_A=A, lora_B=B, scaling=s, magnitude=mag,
                                weight_norm=norm, is_dora=is_dora, bias=None)
    failures = []
    for name, t in (("x", x), ("result", res), ("out", got)):
        base = t.data_ptr()
        dtypes = {str(d) for lo, hi, d in steps if lo == hi == base}
        if dtypes != {"int64"}:
            failures.append((name, dtypes))
    print("FAILURES", failures)
    assert not failures
    """
)


def test_row_offsets_into_activations_are_int64():
    interpret(INT64_OFFSETS)


# mixed_batch_indexed on the prefill path for inputs the other tests do not build: x with
# two token dims, transposed, expanded, or a slice of wider rows; an int32 index that is a
# strided view; a bank of ranks 4 and 70 (padded: two rank tiles, the second half zeros),
# an fp16 bank; DoRA norms as a dict; and layers the decode kernels do not read (3 bits,
# axis 0), at 1 token a row (which decode declines for them) and at 30. Each against
# float64 from the same base output, and no input changed.
EDGES = PRELUDE + textwrap.dedent(
    r"""
    torch.Tensor.is_cuda = property(lambda self: self.device.type == "cpu")
    import hqqlora
    from helpers import make_layer, random_adapter

    taken = []
    def spy(*args, _real=_prefill.lora_prefill, **kwargs):
        taken.append("lora_prefill")
        return _real(*args, **kwargs)
    _prefill.lora_prefill = spy

    def run(what, x, bank, index, layer, weight_norm=None):
        inputs = [x, index, *(t for t in bank if isinstance(t, torch.Tensor))]
        before = [t.clone() for t in inputs]
        with torch.no_grad():
            taken.clear()
            got = hqqlora.mixed_batch_indexed(x, bank, index, base=layer, weight_norm=weight_norm)
            if taken != ["lora_prefill"]:
                failures.append((*what, "path", taken))
            res = hqqlora.base_forward(layer, x)
            norm = None
            if any(bank.dora):
                norm = hqqlora.bank_weight_norm(layer, bank, weight_norm)
        for t, t0 in zip(inputs, before):
            if not torch.equal(t, t0):
                failures.append((*what, "mutated"))
        x3, res3 = x.reshape(x.shape[0], -1, x.shape[-1]), res.reshape(x.shape[0], -1, res.shape[-1])
        is_dora = bank.is_dora if any(bank.dora) else None
        ref, bound = reference(x3, res3, index, bank.lora_A, bank.lora_B, bank.scaling,
                               bank.magnitude, norm, is_dora, layer.bias)
        assert got.shape == res.shape, (what, got.shape)
        check(got.reshape(ref.shape), ref, bound, what, failures)

    torch.manual_seed(0)
    failures = []
    layer = make_layer(96, 80, group_size=32, dtype=torch.float16)
    small = random_adapter(layer, r=4, seed=1)
    wide = random_adapter(layer, r=70, seed=3, scaling=0.5)
    dora = random_adapter(layer, r=6, dora=True, seed=2)
    bank = hqqlora.stack_adapters({"small": small, "wide": wide, "dora": dora})
    x = torch.randn(3, 5, 7, 96).half()
    index = torch.tensor([2, 1, 0])
    run(("4-D x",), x, bank, index, layer)
    run(("4-D x transposed",), x.transpose(1, 2), bank, index, layer)
    run(("x expanded",), x[:1].expand(3, 5, 7, 96), bank, index, layer)
    run(("x sliced",), torch.randn(3, 30, 128).half()[..., 16:112], bank, index, layer)
    strided = torch.tensor([1, 7, -1, 7, 2, 7], dtype=torch.int32)[::2]
    run(("int32 strided index",), x, bank, strided, layer)
    run(("norm dict",), x, bank, index, layer, weight_norm={"dora": torch.rand(80) + 0.5})
    half = {k: {n: (t if n == "scaling" else t.half()) for n, t in p.items()}
            for k, p in {"small": small, "wide": wide, "dora": dora}.items()}
    run(("fp16 bank",), x, hqqlora.stack_adapters(half), index, layer)
    for kw in ({"nbits": 3}, {"axis": 0}):
        other = make_layer(96, 80, group_size=32, dtype=torch.float16, **kw)
        b = hqqlora.stack_adapters({"a": random_adapter(other, r=4),
                                    "d": random_adapter(other, r=6, dora=True, seed=2)})
        for shape in ((3, 96), (3, 30, 96)):
            run((str(kw), shape), torch.randn(shape).half(), b, torch.tensor([1, -1, 0]), other)
    print("FAILURES", failures)
    assert not failures
    """
)


def test_prefill_path_edge_inputs_match_float64():
    interpret(EDGES)
