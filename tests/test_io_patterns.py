r"""rank_pattern / alpha_pattern: PEFT's lookup, by hand, against `re`, against PEFT, in bounded time.

PEFT gives a module the value of the first key with `re.match(rf"(.*\.)?({key})$", path)`.
Only the PEFT parity test needs PEFT.
"""

from __future__ import annotations

import math
import re
import signal
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hqqlora import functional_call, load_adapter
from hqqlora._patterns import compile_pattern
from tests.helpers import assert_close_rel
from tests.test_io_config import PEFT_CONFIG, lora, write_folder
from tests.test_model import make_model


def peft_answer(key, path):
    return re.match(rf"(.*\.)?({key})$", path) is not None


def tiny_modules(ranks):
    """Tensors for Tiny's three layers at the given ranks."""
    shapes = {"fc1": (32, 48), "block.fc2": (48, 48), "fc3": (48, 16)}
    return {p: lora(ranks[p], *shapes[p], seed=i) for i, p in enumerate(shapes)}


@pytest.mark.parametrize(
    ("rslora", "expected"),
    [
        # fc1: rank 4 from rank_pattern, alpha 16; block.fc2: rank 8, alpha 24 from alpha_pattern
        # (matched as a `.`-suffix); fc3: the defaults.
        (False, {"fc1": 16 / 4, "block.fc2": 24 / 8, "fc3": 16 / 8}),
        (True, {"fc1": 16 / 2, "block.fc2": 24 / math.sqrt(8), "fc3": 16 / math.sqrt(8)}),
    ],
)
def test_patterns_by_hand(tmp_path, rslora, expected):
    config = {
        **PEFT_CONFIG,
        "r": 8,
        "lora_alpha": 16,
        "use_rslora": rslora,
        "rank_pattern": {"fc1": 4},
        "alpha_pattern": {"fc2": 24},
    }
    folder = write_folder(tmp_path, config, tiny_modules({"fc1": 4, "block.fc2": 8, "fc3": 8}))
    adapters, _ = load_adapter(folder, model=make_model())
    assert {p: a["lora_A"].shape[0] for p, a in adapters.items()} == {
        "fc1": 4,
        "block.fc2": 8,
        "fc3": 8,
    }
    for path, scaling in expected.items():
        assert adapters[path]["scaling"].item() == pytest.approx(scaling, rel=1e-7), path


def test_first_matching_key_wins(tmp_path):
    config = {
        **PEFT_CONFIG,
        "r": 8,
        "lora_alpha": 16,
        # block.fc2 matches both rank keys and both alpha keys: the first one decides.
        "rank_pattern": {r"block\..*": 2, "fc2": 6, "fc[13]": 4},
        "alpha_pattern": {"fc2|fc3": 12, "block.fc2": 40},
    }
    modules = tiny_modules({"fc1": 4, "block.fc2": 2, "fc3": 4})
    adapters, _ = load_adapter(write_folder(tmp_path, config, modules))
    got = {p: a["scaling"].item() for p, a in adapters.items()}
    assert got == pytest.approx({"fc1": 16 / 4, "block.fc2": 12 / 2, "fc3": 12 / 4}, rel=1e-7)


def test_peft_falls_back_to_the_path_itself(tmp_path):
    """PEFT looks a path up as a key when no key matches it as a regex: "m(1)" matches "m1" only."""
    config = {**PEFT_CONFIG, "r": 4, "lora_alpha": 8, "rank_pattern": {"m(1)": 2, "x": 3}}
    adapters, _ = load_adapter(write_folder(tmp_path, config, {"m(1)": lora(2), "m1": lora(2)}))
    assert {p: a["scaling"].item() for p, a in adapters.items()} == {"m(1)": 4.0, "m1": 4.0}


def test_patterns_match_peft(tmp_path):
    peft = pytest.importorskip("peft")
    for rslora in (False, True):
        config = peft.LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["fc1", "fc2", "fc3"],
            rank_pattern={"fc1": 4, r"block\.fc\d": 2},
            alpha_pattern={"fc2": 24, "fc3": 6},
            use_rslora=rslora,
            init_lora_weights=False,
        )
        model = peft.get_peft_model(make_model(), config).eval()
        model.save_pretrained(tmp_path / str(rslora))
        plain = make_model()
        adapters, _ = load_adapter(tmp_path / str(rslora), model=plain)
        layers = dict(model.base_model.model.named_modules())
        for path, params in adapters.items():
            layer = layers[path]
            assert params["lora_A"].shape[0] == layer.r["default"], path
            assert params["scaling"].item() == pytest.approx(layer.scaling["default"], rel=1e-7)
        x = torch.randn(5, 32)
        with torch.no_grad():
            expected = model(x)
        got = functional_call(plain, adapters, (x,))
        assert_close_rel(got, expected, torch.float32, factor=10)


@pytest.mark.parametrize(
    ("key", "path", "matched"),
    [
        ("(a+)+$", "a" * 40 + "b", False),  # 36 s at 30 characters with `re`
        ("(a|aa)+$", "a" * 40 + "!", False),
        ("(a|aa)+$", "x." + "a" * 40, True),
        ("(.*a){12}", "a" * 40 + "b", False),
    ],
)
def test_hostile_pattern_key_loads_in_bounded_time(tmp_path, key, path, matched):
    config = {**PEFT_CONFIG, "r": 4, "lora_alpha": 8, "alpha_pattern": {key: 4}}
    folder = write_folder(tmp_path, config, {path: lora(4)})

    def stalled(signum, frame):
        raise TimeoutError("load_adapter stalled on a pattern key")

    previous = signal.signal(signal.SIGALRM, stalled)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        started = time.perf_counter()
        adapters, _ = load_adapter(folder)
        elapsed = time.perf_counter() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert elapsed < 1.0
    assert adapters[path]["scaling"].item() == (4 / 4 if matched else 8 / 4)


# Keys as PEFT and its users write them: exact paths (hqqlora's save_adapter), suffixes,
# `.*\.`-prefixed (PEFT's transformers conversion), and ordinary regexes.
PATHS = [
    "fc1",
    "block.fc2",
    "model.layers.0.self_attn.q_proj",
    "model.layers.11.self_attn.v_proj",
    "model.layers.3.mlp.down_proj",
    "encoder.layer.10.attention.self.query",
    "lm_head",
    "a.b\n",
    "",
]
KEYS = [
    "fc1",
    "fc2",
    "^fc1",
    "^" + re.escape("block.fc2"),
    "^" + re.escape("model.layers.0.self_attn.q_proj"),
    r".*\." + re.escape("q_proj"),
    "q_proj",
    "self_attn.q_proj",
    "q_proj|v_proj",
    "(q|v)_proj",
    r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
    r"layers\.[0-3]\..*",
    r"layers\.(1[0-9]|[4-9])\.mlp\..*_proj",
    "model.layers.*.q_proj",
    r".*\.layer\.1\d?\.attention.*",
    r"(?:encoder|decoder)\.layer\.\d{1,2}\.attention\.self\.(query|key|value)",
    r"\w+_proj",
    r"\bq_proj\b",
    r"[^.]+",
    r"a\.b",
    "",
    "x)|(.*",  # breaks out of PEFT's group; PEFT's answer is still the answer
    "fc1$",
    r"fc1\Z",
]


@pytest.mark.parametrize("key", KEYS)
def test_usual_keys_match_like_peft(key):
    matches = compile_pattern(key)
    for path in PATHS:
        assert matches(path) == peft_answer(key, path), (key, path)


ATOMS = ["a", "b", ".", r"\.", "[ab]", "[^a.]", r"\d", r"\w", r"\W", r"\s", "_", "^", "$"]
ATOMS += [r"\b", r"\B", r"\A", r"\Z", "(?:a|b.)", "(a|)", "[a-c1]", "1"]
QUANTIFIERS = ["", "*", "+", "?", "{2}", "{1,3}", "{0,2}", "*?", "+?", "??", "{2,}"]


@st.composite
def keys(draw, depth=0):
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 3 if depth < 2 else 0))
        if kind == 0:
            parts.append(draw(st.sampled_from(ATOMS)))
        elif kind == 1:
            parts.append(f"({draw(keys(depth + 1))})" + draw(st.sampled_from(QUANTIFIERS)))
        elif kind == 2:
            parts.append(f"(?:{draw(keys(depth + 1))})" + draw(st.sampled_from(QUANTIFIERS)))
        else:
            parts.append(f"{draw(keys(depth + 1))}|{draw(keys(depth + 1))}")
    return "".join(parts)


@settings(max_examples=400, deadline=None)
@given(key=keys(), paths=st.lists(st.text("ab.1_ \n", max_size=9), min_size=1, max_size=6))
def test_any_regular_key_matches_like_re(key, paths):
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error:
        with pytest.raises(ValueError, match="valid regular expressions"):
            compile_pattern(key)
        return
    matches = compile_pattern(key)
    for path in paths:
        assert matches(path) == peft_answer(key, path), (key, path)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (r"(a)\3", "groupref"),
        ("(?=a)fc1", "assert"),
        ("(?<!x)fc1", "assert"),
        ("(?>a+)fc1", "atomic"),
        ("a++", "possessive"),
        ("(?i:FC1)", "scoped flags"),
        ("(?(1)a|b)", "groupref_exists"),
        ("(a{100}){100}", "states"),
        ("a{2001}", "states"),
    ],
)
def test_keys_without_a_bounded_match_are_refused(tmp_path, key, why):
    config = {**PEFT_CONFIG, "rank_pattern": {key: 2}}
    folder = write_folder(tmp_path, config, {"fc1": lora(4)})
    with pytest.raises(ValueError, match=rf"`rank_pattern` keys .*{re.escape(repr(key))}.*{why}"):
        load_adapter(folder)


@pytest.mark.parametrize("key", ["(", "fc1)", "[a", "(?i)fc1", "*"])
def test_invalid_keys_are_value_errors(tmp_path, key):
    config = {**PEFT_CONFIG, "alpha_pattern": {key: 2}}
    folder = write_folder(tmp_path, config, {"fc1": lora(4)})
    with pytest.raises(ValueError, match=r"`alpha_pattern` keys to be valid regular expressions"):
        load_adapter(folder)
