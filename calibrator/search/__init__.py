"""The accuracy-driven search: meet -l with the fewest FP32 layers and full evaluations.

Pieces, each with one job (the loop in ``loop.py`` only sequences them):
  ``metric``      what a full evaluation measures (Accuracy blob, mAP), per sample too
  ``evaluator``   runs full evaluations, counts and caches them (resumable state)
  ``sensitivity`` the cheap, label-free ranking of quantized layers
  ``adjust``      cheaper fixes before reverting (estimators, per-channel, EasyQuant)
  ``loop``        the strategies: ``bisect`` (default) and ``intel`` (legacy)
"""
