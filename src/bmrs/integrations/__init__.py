"""Optional integrations, each behind its extra and imported only by whoever uses it:

* :mod:`bmrs.integrations.lightning`: the ``BMRSPruning`` Lightning callback (``bmrs[lightning]``);
* :mod:`bmrs.integrations.transformers`: Hugging Face models, their heads and feed-forward
  neurons (``bmrs[transformers]``), found through :mod:`bmrs.structures.adapters` when such
  a model is handed to bmrs.

No library module imports them (this package imports nothing either).
"""
