"""Bootstrap intervals over seeds and problems: exact where the answer is forced, and a known spread."""

import numpy as np
import pytest

from selfimprove.intervals import gain_interval, mean_interval


def test_outcomes_all_alike_give_an_interval_of_one_point():
    assert mean_interval([[1, 1, 1], [1, 1]]) == (1.0, 1.0, 1.0)
    assert mean_interval([[0, 0, 0, 0]]) == (0.0, 0.0, 0.0)


def test_the_mean_is_over_every_problem_of_every_seed_and_the_interval_holds_it():
    """Seeds [1, 0] and [1, 1, 1, 0]: 4 of 6 correct, mean 2/3."""
    mean, low, high = mean_interval([[1, 0], [1, 1, 1, 0]])
    assert mean == pytest.approx(2 / 3)
    assert 0 <= low < mean < high <= 1


def test_one_seed_of_half_right_has_about_the_normal_width():
    """400 problems, half right: standard error sqrt(0.25 / 400) = 0.025, so the 95% interval is about
    0.5 +- 1.96 * 0.025 = [0.451, 0.549]; the bootstrap's percentiles land within 0.01 of that."""
    mean, low, high = mean_interval([[1, 0] * 200])
    assert mean == 0.5
    assert low == pytest.approx(0.451, abs=0.01) and high == pytest.approx(0.549, abs=0.01)


def test_seeds_that_disagree_widen_the_interval_beyond_the_problems_alone():
    one = mean_interval([[1, 0] * 100 + [1, 0] * 100])
    split = mean_interval([[1] * 160 + [0] * 40, [1] * 40 + [0] * 160])  # the same 400 outcomes, by seed 0.8 / 0.2
    assert one[0] == split[0] == 0.5
    assert split[2] - split[1] > 2 * (one[2] - one[1])


def test_the_same_data_give_the_same_interval():
    data = [list(np.random.default_rng(3).integers(0, 2, 50))]
    assert mean_interval(data) == mean_interval(data)


def test_a_gain_pairs_problems_and_refuses_unpaired_outcomes():
    """Before [0, 0, 1, 1], after [1, 1, 1, 1]: the gain is +0.5 per problem on average; every draw of the
    differences [1, 1, 0, 0] stays in [0, 1]."""
    mean, low, high = gain_interval([[0, 0, 1, 1]], [[1, 1, 1, 1]])
    assert mean == 0.5 and 0 <= low <= 0.5 <= high <= 1
    with pytest.raises(ValueError, match="same problems before and after"):
        gain_interval([[0, 1]], [[1]])
    with pytest.raises(ValueError, match="no outcomes"):
        mean_interval([[]])
