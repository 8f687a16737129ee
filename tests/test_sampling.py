"""Sampling: the filtered distribution, greedy picks, seeded reproducibility and a goodness-of-fit
test of the sampler against the distribution it claims to draw from."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowspec_zmq.sampling import SamplingParams, filtered_probs, pick_tokens

SETTINGS = settings(max_examples=80, deadline=None)


def random_logits(seed: int, rows: int = 3, vocab: int = 40, scale: float = 3.0) -> torch.Tensor:
    # Continuous random values: ties have probability zero.
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@SETTINGS
@given(st.integers(0, 2**31), st.integers(1, 40), st.floats(0.2, 3.0))
def test_top_k_keeps_exactly_the_k_largest(seed: int, k: int, temperature: float) -> None:
    logits = random_logits(seed)
    probs = filtered_probs(logits, SamplingParams(temperature=temperature, top_k=k))
    for row_logits, row in zip(logits, probs):
        kept = set(torch.nonzero(row).flatten().tolist())
        assert kept == set(torch.topk(row_logits, k).indices.tolist())
        expected = torch.softmax(row_logits[sorted(kept)] / temperature, dim=-1)
        torch.testing.assert_close(row[sorted(kept)], expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(logits)))


def test_top_k_larger_than_vocab_keeps_everything() -> None:
    logits = random_logits(1, vocab=10)
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=50))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


@SETTINGS
@given(st.integers(0, 2**31), st.floats(0.01, 0.99), st.floats(0.3, 2.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(seed: int, top_p: float, temperature: float) -> None:
    logits = random_logits(seed)
    probs = filtered_probs(logits, SamplingParams(temperature=temperature, top_p=top_p))
    for row_logits, row in zip(logits, probs):
        full = torch.softmax(row_logits.double() / temperature, -1)
        order = torch.argsort(full, descending=True).tolist()
        mass, keep = 0.0, []
        for token in order:  # walk down until the mass reaches p
            keep.append(token)
            mass += float(full[token])
            if mass >= top_p:
                break
        # Skip the measure-zero cases where float rounding decides the boundary token.
        if abs(mass - float(full[keep[-1]]) - top_p) < 1e-5 or abs(mass - top_p) < 1e-5:
            continue
        assert set(torch.nonzero(row).flatten().tolist()) == set(keep)
        expected = full[keep] / full[keep].sum()
        torch.testing.assert_close(row[keep].double(), expected, rtol=1e-5, atol=1e-6)


def test_top_p_example() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # The first token alone reaches 0.4: only it stays.
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.4))
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_top_k_then_top_p() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # top_k=3 renormalises to 4/9, 3/9, 2/9; top_p=0.7 then keeps the first two (7/9 >= 0.7).
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 1.8])
def test_temperature_scales_logits(temperature: float) -> None:
    logits = random_logits(7, rows=4, vocab=25)
    probs = filtered_probs(logits, SamplingParams(temperature=temperature))
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, -1))


def test_lower_temperature_sharpens() -> None:
    logits = random_logits(8, rows=1, vocab=30)
    top = int(logits.argmax())
    cold = filtered_probs(logits, SamplingParams(temperature=0.3))[0, top]
    warm = filtered_probs(logits, SamplingParams(temperature=2.0))[0, top]
    assert cold > warm


def test_filtered_probs_accepts_half_precision_logits() -> None:
    logits = random_logits(9).to(torch.bfloat16)
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=5))
    assert probs.dtype == torch.float32
    assert int((probs > 0).sum()) == 5 * logits.shape[0]


@SETTINGS
@given(st.integers(0, 2**31), st.integers(1, 8))
def test_greedy_is_argmax(seed: int, rows: int) -> None:
    logits = random_logits(seed, rows=rows, vocab=100)
    params = SamplingParams()
    assert params.greedy
    picks = pick_tokens(logits, list(range(rows)), params)
    assert picks == logits.argmax(-1).tolist()
    # Greedy ignores seeds and positions.
    assert pick_tokens(logits, [5] * rows, SamplingParams(seed=3)) == picks


def test_seeded_picks_are_reproducible_and_depend_on_position_and_seed() -> None:
    vocab = 1000
    logits = torch.zeros(1, vocab)  # uniform over 1000 tokens: repeats across draws are rare
    params = SamplingParams(temperature=1.0, seed=11)
    positions = list(range(100, 160))
    rows = logits.expand(len(positions), vocab)
    picks = pick_tokens(rows, positions, params)
    assert picks == pick_tokens(rows, positions, params)
    # The same position always gets the same token, whatever else is in the batch.
    for i in (0, 17, 59):
        assert pick_tokens(logits, [positions[i]], params) == [picks[i]]
    assert pick_tokens(rows[:5], positions[::-1][:5], params) == picks[::-1][:5]
    # Different positions draw differently ...
    assert len(set(picks)) > len(picks) // 2
    # ... and so does a different seed at the same positions.
    other = pick_tokens(rows, positions, SamplingParams(temperature=1.0, seed=12))
    assert sum(a != b for a, b in zip(picks, other)) > len(picks) // 2


def test_sampled_picks_respect_filters() -> None:
    logits = random_logits(10, rows=1, vocab=50).expand(300, 50)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    picks = pick_tokens(logits, list(range(300)), SamplingParams(temperature=1.3, top_k=3, seed=2))
    assert set(picks) <= allowed


# Upper critical values of the chi-square distribution at p = 0.001, by degrees of freedom.
CHI2_CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 9: 27.877}


def chi_square(observed: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("seed", [0, 1234])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_pick_tokens_matches_filtered_probs(seed: int, temperature: float) -> None:
    """4000 draws at different positions from one logits row follow filtered_probs (top_k=5)."""
    draws, vocab = 4000, 64
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(99)) * 0.3 - 4.0
    # Five clearly leading tokens whose probabilities differ (each expects > 5 draws).
    leaders = torch.tensor([5, 17, 30, 41, 60])
    logits[leaders] = torch.tensor([1.2, 0.9, 0.5, 0.2, -0.3])
    params = SamplingParams(temperature=temperature, top_k=5, seed=seed)
    probs = filtered_probs(logits[None], params)[0]
    assert set(torch.nonzero(probs).flatten().tolist()) == set(leaders.tolist())

    picks = torch.tensor(pick_tokens(logits.expand(draws, vocab), list(range(draws)), params))
    counts = torch.bincount(picks, minlength=vocab).double()
    assert counts[probs == 0].sum() == 0, "a token outside the top 5 was drawn"
    expected = probs[leaders].double() * draws
    assert expected.min() > 5
    statistic = chi_square(counts[leaders], expected)
    critical = CHI2_CRITICAL_0_001[len(leaders) - 1]
    try:
        from scipy.stats import chi2  # optional: cross-check the hard-coded critical value
    except ImportError:  # scipy is not a dependency; the table above suffices
        pass
    else:
        assert abs(chi2.ppf(0.999, len(leaders) - 1) - critical) < 1e-2
    assert statistic < critical, f"chi-square {statistic:.2f} >= {critical} (counts {counts[leaders].tolist()})"


def test_chi_square_detects_a_wrong_distribution() -> None:
    # The same test must reject draws from a different distribution (power check of the harness).
    draws = 4000
    probs = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08], dtype=torch.float64)
    skewed = torch.tensor([0.45, 0.22, 0.15, 0.10, 0.08], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    picks = torch.multinomial(skewed, draws, replacement=True, generator=generator)
    counts = torch.bincount(picks, minlength=5).double()
    assert chi_square(counts, probs * draws) > CHI2_CRITICAL_0_001[4]
