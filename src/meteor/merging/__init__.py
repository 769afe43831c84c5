"""Merge (AutoLLM, ADMIRE-BayesOpt): one LoRA delta per data chunk on top of the self-trained
model, weights found by Bayesian optimisation on a dev objective, saved as one exact adapter.

* :mod:`.chunks` — the selected data split into K chunks;
* :mod:`.deltas` — θ_self_train + Σ w_k·Δ_k in one peft model, weights switched in memory, and
  the exact ``cat`` export;
* :mod:`.objective` — dev reference-answer NLL (default) or judge score;
* :mod:`.search` — the optuna study (seeded, SQLite, resumable) and the GP posterior mean;
* :mod:`.run` — all of it end to end, with the AutoLLM-style table;
* :mod:`.report` — the search-trace plot.
"""
