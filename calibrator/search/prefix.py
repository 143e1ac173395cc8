"""The shortest prefix of the ranking whose reversion to FP32 meets ``-l``.

``met(k)`` is one full evaluation of the plan with the ``k`` most sensitive layers in FP32;
``met(count)`` (every ranked layer FP32: the FP32 metric) is known true and never asked.
Assuming ``met`` is monotone in ``k``, the search gallops (1, 2, 4, ...) to the first size
that meets ``-l``, then bisects between it and the last size that did not. A run that needs
``k`` layers reverted costs ``2 * ceil(log2 k) + 1`` evaluations at most (one for
``k = 1``, the common case once the adjustments have run) and about ``2 * log2(count)``
at worst (:func:`evaluations_bound`: 11 for 51 layers), where a bisection of the whole
ranking spends ``ceil(log2 count)`` every time (6 for 51)."""

from __future__ import annotations

from collections.abc import Callable


def evaluations_bound(count: int) -> int:
    """The most evaluations :func:`shortest_met_prefix` spends on ``count`` ranked layers
    (reached): ``g`` gallops below ``count``; either all fail and the bisection spans
    ``count - 2^(g-1)``, or the last succeeds after ``g - 1`` failures and bisects ``g - 2``."""
    gallops = max(count - 1, 0).bit_length()  # the sizes 1, 2, 4, ... below count
    if gallops == 0:
        return 0
    all_fail = gallops + (count - 2 ** (gallops - 1) - 1).bit_length()
    return max(all_fail, 2 * (gallops - 1), 1)


def shortest_met_prefix(count: int, met: Callable[[int], bool]) -> int:
    """The smallest ``k`` in ``1..count`` with ``met(k)`` (``count`` if none below it)."""
    low, high = 0, count  # low: known not met (0: nothing reverted); high: known met
    size = 1
    while size < high:  # galloping: 1, 2, 4, ... below count
        if met(size):
            high = size
            break
        low, size = size, 2 * size
    while high - low > 1:  # bisection between the last size not met and the first met
        middle = (low + high) // 2
        if met(middle):
            high = middle
        else:
            low = middle
    return high
