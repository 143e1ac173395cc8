"""The accuracy-driven search: meet -l with the fewest FP32 layers and full evaluations.

Pieces, each with one job (the loop in ``loop.py`` only sequences them; what a full
evaluation measures is a :mod:`calibrator.metrics` Metric, what it runs the backend's
simulator):
  ``evaluator``        runs full evaluations, counts and caches them (resumable state)
  ``reuse``            evaluations resumed at a cut from an earlier plan's blobs
  ``sensitivity``      the cheap, label-free ranking of quantized layers
  ``adjust``           cheaper fixes before reverting (estimators, per-channel, EasyQuant)
  ``countermeasures``  per-layer fixes for targets that saturate int16 pair sums
  ``prefix``           the shortest prefix of the ranking to revert (galloping, bisection)
  ``loop``             the strategies: ``bisect`` (default) and ``intel`` (legacy)
"""

from calibrator.search.evaluator import Evaluator, SearchState
from calibrator.search.loop import Search, SearchResult, SearchSettings
from calibrator.search.reuse import PrefixReuse

__all__ = ["Evaluator", "PrefixReuse", "Search", "SearchResult", "SearchSettings",
           "SearchState"]
