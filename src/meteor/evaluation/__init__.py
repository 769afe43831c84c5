"""Evaluation of the journey (METEOR's evaluation, with the SelFee / MT-bench judge protocol).

- :mod:`.answers`: a model answers the test questions (greedy, batched) and gets its objective
  metrics: reference-answer perplexity, ROUGE-L, answer length, stop rate.
- :mod:`.judge`: the judge scores each answer alone and compares it with the baseline's in both
  orders; every call is kept as a judgment row.
- :mod:`.aggregate`: win shares, position consistency, mean scores and bootstrap intervals.
- :mod:`.report`: the METEOR-format and journey tables, ``metrics/eval.json`` and the plot.

Submodules are imported on their own (this file imports none), so the judge and report stages
load neither torch nor a model.
"""
