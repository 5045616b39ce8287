"""Tests for expertmesh.sampling: parameter validation, sampling maths and the reproducibility contract."""

import math

import pytest
import torch

from expertmesh.sampling import SamplingParams, make_generator, next_token_probs, sample

V = 32  # vocabulary size for most tests


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    # Plain allclose: torch.testing.assert_close costs about a second of imports on first use.
    assert torch.allclose(actual, expected, atol=atol, rtol=0), f"{actual} != {expected} (atol {atol})"


def _draws(logits_row: torch.Tensor, params: SamplingParams, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """n draws from one row's distribution in a single call: rows sharing a generator draw in turn."""
    logits = logits_row.unsqueeze(0).expand(n, -1)
    return sample(logits, [params] * n, [gen] * n)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("top_p", math.nan),
        ("max_new_tokens", 0),
        ("stop", ("",)),
        ("stop", ("ok", "")),
        ("stop", "</s>"),
        ("stop", ("x",) * 33),
        ("stop", ("ok", "x" * 257)),
        ("stop_token_ids", (V,)),
        ("stop_token_ids", (-1,)),
        ("seed", -1),
        ("seed", 2**63),
    ],
)
def test_invalid_field_raises_value_error_naming_it(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        params.validate(vocab_size=V)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=0, stop=("\n\n",), stop_token_ids=(0, V - 1)),
        SamplingParams(top_p=1.0, seed=2**63 - 1, max_new_tokens=1),
        SamplingParams(stop=tuple(chr(97 + i) * 256 for i in range(32))),
    ],
)
def test_valid_params_pass(params):
    params.validate(vocab_size=V)
    params.validate()


def test_stop_token_ids_unbounded_without_vocab_size():
    SamplingParams(stop_token_ids=(10**6,)).validate()


def test_greedy_property():
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.5).greedy
    # Below 1e-5 a temperature is its greedy limit (dividing by it would overflow float32).
    assert SamplingParams(temperature=1e-6).greedy and SamplingParams(temperature=1e-45).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    assert make_generator(SamplingParams(temperature=1e-6, seed=1)) is None


def test_make_generator():
    assert make_generator(SamplingParams(seed=3)) is None  # greedy: nothing to draw
    gen = make_generator(SamplingParams(temperature=1.0, seed=3))
    assert gen is not None and gen.initial_seed() == 3
    assert make_generator(SamplingParams(temperature=1.0)) is not None  # unseeded still gets its own


def test_sample_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="params and generators"):
        sample(torch.zeros(2, V), [SamplingParams()], [None, None])
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(V), [SamplingParams()], [None])


# --- sampling maths ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = sample(logits, [SamplingParams()] * 8, [None] * 8)
    assert out.dtype == torch.int64 and out.shape == (8,)
    assert torch.equal(out, logits.float().argmax(dim=-1))


def test_greedy_ties_go_to_lowest_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    assert sample(logits, [SamplingParams()] * 2, [None] * 2).tolist() == [1, 0]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.5, top_k=1, seed=1), SamplingParams(temperature=1.5, top_p=1e-6, seed=1),
     SamplingParams(temperature=1e-45, seed=1)],
    ids=["top_k=1", "tiny top_p", "tiny temperature"],
)
def test_degenerate_filters_equal_argmax(params):
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(1))
    gen = make_generator(params)
    assert torch.equal(sample(logits, [params] * 64, [gen] * 64), logits.argmax(dim=-1))


def test_top_k_restricts_draws_to_k_best():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=5.0, top_k=4, seed=2)  # hot, so all 4 get drawn often
    draws = _draws(logits, params, 1000, make_generator(params))
    assert set(draws.tolist()) == set(torch.topk(logits, 4).indices.tolist())


def test_top_k_keeps_ties_with_kth_value():
    probs = next_token_probs(torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0]), SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [True, False, True, True, False]


def test_nucleus_keeps_smallest_set_reaching_top_p():
    # Sorted mass: 0.5, 0.75, 0.9, 1.0. top_p=0.7 needs {0, 1}; 0.8 needs {0, 1, 2}.
    logits = torch.tensor([0.15, 0.5, 0.1, 0.25]).log()
    probs = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    _assert_close(probs, torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]))
    probs = next_token_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    _assert_close(probs, torch.tensor([0.15, 0.5, 0.0, 0.25]) / 0.9)

    params = SamplingParams(temperature=1.0, top_p=0.7, seed=3)
    draws = _draws(logits, params, 1000, make_generator(params))
    assert set(draws.tolist()) == {1, 3}


def test_top_k_then_top_p():
    # top_p is applied to the top-k renormalised distribution: top_k=3 turns [0.5, 0.25, 0.15] into
    # [.556, .278, .167], so top_p=0.8 needs only two tokens (it would need three without top_k).
    logits = torch.tensor([0.15, 0.5, 0.1, 0.25]).log()
    probs = next_token_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    assert (probs > 0).tolist() == [False, True, False, True]


def test_same_seed_same_draws_different_seed_different_draws():
    flat = torch.zeros(1000)

    def sequence(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed)
        gen = make_generator(params)
        return [sample(flat[None], [params], [gen]).item() for _ in range(20)]

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)


def test_row_draws_independent_of_batch_composition_and_order():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(4))
    params = [
        SamplingParams(temperature=0.8, seed=10),
        SamplingParams(),
        SamplingParams(temperature=1.3, top_k=5, seed=11),
        SamplingParams(temperature=1.0, top_p=0.6, seed=12),
        SamplingParams(temperature=2.0, top_k=8, top_p=0.9, seed=13),
        SamplingParams(temperature=1.0, seed=14),
    ]
    steps = 10

    # Reference: each request decoded alone.
    alone = []
    for b in range(6):
        gen = make_generator(params[b])
        alone.append([sample(logits[b : b + 1], [params[b]], [gen]).item() for _ in range(steps)])

    # Same requests batched in a shuffled order, next to strangers that also draw from the global
    # RNG and from their own generators.
    order = [3, 0, 5, 1, 4, 2]
    stranger = SamplingParams(temperature=1.0, seed=99)
    batch_params = [params[b] for b in order] + [stranger, SamplingParams(temperature=1.0)]
    batch_logits = torch.cat([logits[order], torch.zeros(2, V)])
    gens = [make_generator(p) for p in batch_params[:-1]] + [None]
    batched = [[] for _ in range(6)]
    for _ in range(steps):
        out = sample(batch_logits, batch_params, gens)
        for pos, b in enumerate(order):
            batched[b].append(out[pos].item())

    assert batched == alone


def test_frequencies_match_tempered_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    params = SamplingParams(temperature=0.7, seed=5)
    n = 5000
    draws = _draws(logits, params, n, make_generator(params))
    freq = torch.bincount(draws, minlength=6).float() / n
    expected = torch.softmax(logits / 0.7, dim=-1)  # ~[.44, .22, .11, .05, .03, .002]
    # Standard error is at most sqrt(0.25 / n) ~ 0.007, so 0.03 is over four of them, yet it still
    # tells T=0.7 from T=1 (top token 0.35) or from an off-by-one in the filters.
    _assert_close(freq, expected, atol=0.03)
    assert abs(freq[0] - torch.softmax(logits, dim=-1)[0]) > 0.06
