import numpy as np
import pytest

from datalens.core.sampling import model_seed, subset_mask, subset_masks


def test_masks_are_a_pure_function_of_seed_and_index():
    a = subset_masks(3, [0, 1, 2, 7], 500, 0.5)
    b = np.stack([subset_mask(3, i, 500, 0.5) for i in [0, 1, 2, 7]])
    assert np.array_equal(a, b)
    # the same index in a different order or company gives the same mask
    assert np.array_equal(subset_masks(3, [7, 0], 500, 0.5)[0], a[3])
    # different indices, seeds and streams differ
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(subset_mask(4, 0, 500, 0.5), a[0])
    assert not np.array_equal(subset_mask(3, 0, 500, 0.5, stream="eval"), a[0])


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.75, 1.0])
def test_inclusion_rate_matches_alpha_within_binomial_error(alpha):
    n, m = 1000, 200
    masks = subset_masks(0, range(m), n, alpha)
    rate = masks.mean()
    se = np.sqrt(alpha * (1 - alpha) / (n * m))
    assert abs(rate - alpha) <= 4 * se + 1e-12
    # each example's own inclusion frequency is binomial too (no example is favoured)
    per_example = masks.mean(0)
    assert np.abs(per_example - alpha).max() <= 5 * np.sqrt(alpha * (1 - alpha) / m) + 1e-12


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match=r"alpha.*\(0, 1\]"):
        subset_mask(0, 0, 10, alpha)


def test_model_seeds_differ_by_repeat_and_index():
    seeds = {model_seed(0, j, r) for j in range(20) for r in range(3)}
    assert len(seeds) == 60
    assert model_seed(0, 5, 1) == model_seed(0, 5, 1)
