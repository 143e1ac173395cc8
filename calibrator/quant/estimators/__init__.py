"""Range estimators: a threshold T from the statistics of one tensor.

``-a`` names one: ``KL`` (default), ``DIRECT``, ``MAXP``, ``MA``, ``MSE`` or
``PERCENTILE<p>``. Each is a small :class:`~calibrator.quant.estimators.base.Estimator`
object in its own module, registered here by name (``register_estimator``) or, for a
parametrised family such as ``PERCENTILE<p>``, by prefix (``register_family``). An
estimator declares the statistics it needs; the calibration gathers the union of what the
estimators it will use need (:func:`statistics_needed`)."""

from __future__ import annotations

from typing import Callable, Iterable

from calibrator.errors import CalibratorError, shorten
from calibrator.quant.estimators.base import BASIC, HISTOGRAM, Estimator, TensorStats
from calibrator.quant.estimators.direct import Direct
from calibrator.quant.estimators.entropy import Entropy
from calibrator.quant.estimators.moving_average import MovingAverage
from calibrator.quant.estimators.mse import MeanSquaredError
from calibrator.quant.estimators.percentile import Percentile, maxp

_ESTIMATORS: dict[str, Estimator] = {}
#: prefix -> (factory of the parameter, default parameter, help)
_FAMILIES: dict[str, tuple[Callable[[float], Estimator], float, str]] = {}


def register_estimator(estimator: Estimator) -> Estimator:
    """Make ``-a estimator.name`` (case-insensitive) use this estimator."""
    name = estimator.name.upper()
    if not name or name in _ESTIMATORS:
        raise ValueError(f"estimator '{estimator.name}' registered twice or unnamed")
    _ESTIMATORS[name] = estimator
    return estimator


def register_family(prefix: str, factory: Callable[[float], Estimator], default: float,
                    description: str) -> None:
    """Make ``-a <prefix><number>`` build ``factory(number)``; the number is required
    (``default`` is the one the help suggests)."""
    _FAMILIES[prefix.upper()] = (factory, default, description)


register_estimator(Entropy())
register_estimator(Direct())
register_estimator(maxp())
register_estimator(MovingAverage())
register_estimator(MeanSquaredError())
register_family("PERCENTILE", Percentile, 99.99, "the p-th percentile of |x|, 0 < p <= 100")


def estimator_names() -> tuple[str, ...]:
    return tuple(_ESTIMATORS) + tuple(f"{prefix}<p>" for prefix in _FAMILIES)


def describe_estimators() -> str:
    return "; ".join([f"{name}: {e.description}" for name, e in _ESTIMATORS.items()]
                     + [f"{prefix}<p>: {text}" for prefix, (_, _, text) in _FAMILIES.items()])


def _family(upper: str) -> tuple[str, float] | None:
    for prefix, (_, default, _) in _FAMILIES.items():
        if upper.startswith(prefix):
            text = upper[len(prefix):].lstrip(":=")
            try:
                value = float(text)
            except ValueError:
                return None
            return prefix, value
    return None


def parse_estimator(name: str) -> str:
    """The canonical name of an estimator (e.g. ``percentile99.9`` -> ``PERCENTILE99.9``);
    a CalibratorError for an unknown one."""
    upper = name.upper()
    if upper in _ESTIMATORS:
        return upper
    found = _family(upper)
    if found is not None:
        prefix, value = found
        if 0 < value <= 100:
            return f"{prefix}{value:g}"
    for prefix, (_, default, text) in _FAMILIES.items():
        if upper.startswith(prefix):
            raise CalibratorError(f"-a {shorten(name)}: {prefix}<p> needs its number p, "
                                  f"{text} (e.g. {prefix}{default:g})")
    raise CalibratorError(f"unknown range estimator '{name}' (use "
                          f"{', '.join(estimator_names())}, e.g. PERCENTILE99.99)")


def get_estimator(name: str) -> Estimator:
    canonical = parse_estimator(name)
    if canonical in _ESTIMATORS:
        return _ESTIMATORS[canonical]
    prefix, value = _family(canonical)
    return _FAMILIES[prefix][0](value)


def threshold(stats: TensorStats, estimator: str, bits: int = 8) -> float:
    """T for ``stats`` by the named estimator; never negative, never NaN."""
    return get_estimator(estimator).threshold(stats, bits)


def statistics_needed(names: Iterable[str]) -> frozenset[str]:
    """The statistics the named estimators need together."""
    needs = {BASIC}
    for name in names:
        needs |= get_estimator(name).needs
    return frozenset(needs)


__all__ = ["BASIC", "HISTOGRAM", "Estimator", "TensorStats", "register_estimator",
           "register_family", "estimator_names", "describe_estimators", "parse_estimator",
           "get_estimator", "threshold", "statistics_needed"]
