"""search.prefix: the shortest reverted prefix meeting -l, against a brute force over every
ranking length and every answer, with the evaluations it spends counted."""

from __future__ import annotations

import math

import pytest

from calibrator.search.prefix import evaluations_bound, shortest_met_prefix


def _search(count: int, needed: int):
    asked = []

    def met(size: int) -> bool:
        assert 1 <= size < count, "met(count) is known (every layer FP32) and never asked"
        assert size not in asked, "a size is evaluated once"
        asked.append(size)
        return size >= needed

    return shortest_met_prefix(count, met), asked


@pytest.mark.parametrize("count", [*range(1, 70), 127, 128, 129, 200])
def test_finds_the_brute_force_answer_within_its_bound(count):
    for needed in range(1, count + 1):
        brute = min(k for k in range(1, count + 1) if k == count or k >= needed)
        found, asked = _search(count, needed)
        assert found == brute
        assert len(asked) <= evaluations_bound(count)
        # small answers cost little: the reason for galloping rather than bisecting
        assert len(asked) <= (1 if needed == 1 else 2 * math.ceil(math.log2(needed)) + 1)


def test_one_layer_costs_one_evaluation_where_bisection_spends_six():
    found, asked = _search(51, 1)  # MobileNetV2: 51 quantized convolutions
    assert (found, asked) == (1, [1])
    found, asked = _search(51, 3)
    assert found == 3 and asked == [1, 2, 4, 3]


def test_bound_is_reached():
    """The bound is the worst case over every answer, not only above it."""
    for count in range(1, 300):
        worst = max((len(_search(count, needed)[1]) for needed in range(1, count + 1)))
        assert worst == evaluations_bound(count)
    assert evaluations_bound(51) == 11  # MobileNetV2: against 6 for a plain bisection


def test_a_non_monotone_answer_stays_within_the_ranking():
    """met need not be monotone (evaluations are noisy): the answer is still a size that met,
    or the whole ranking."""
    pattern = {1: False, 2: True, 3: False, 4: True, 5: False, 6: True, 7: False}
    for count in range(2, 9):
        found = shortest_met_prefix(count, lambda k: pattern[k])
        assert found == count or pattern[found]
