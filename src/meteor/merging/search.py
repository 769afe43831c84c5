"""Bayesian optimisation of the merge weights with optuna, stored in SQLite so it resumes.

The search space is w ∈ [0, w_max]^K. The study is seeded (``enqueue_trial``) with the points of
AutoLLM's table: zeros (no delta), each one-hot (one delta alone), uniform 1/K (average merge)
and all-ones (task-arithmetic sum); then ``trials`` more points come from the sampler: optuna's
``GPSampler`` (Matérn-5/2 GP, log-EI) by default or ``TPESampler``.

The study lives in an SQLite file named by a hash of everything the objective depends on, so a
killed search resumes from its stored trials and a finished one is read back, not re-run (the
trials a resumed sampler proposes can differ from an uninterrupted run's: a new sampler instance
starts a fresh random state). Running trials found at start are left over from a killed run
(one writer per study is assumed) and are marked failed.

With the GP sampler the posterior-mean recommendation (ADMIRE-BayesOpt) is also computed: the
argmax of the GP's posterior mean over the box, fit on every trial with optuna's own GP code and
priors, and evaluated once as an extra trial (role ``posterior_mean``), so its measured objective
can be compared with the best trial's.

``evaluate(weights) -> (objective, seconds_switching, seconds_evaluating)`` is all this module
knows of the model, so it is tested on synthetic objectives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

Evaluate = Callable[[dict[str, float]], tuple[float, float, float]]
SEARCH = "search"
POSTERIOR_MEAN = "posterior_mean"


def param_name(chunk: str) -> str:
    return f"w_{chunk}"


def stable_hash(obj) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys): a cache key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False,
                                     default=str).encode()).hexdigest()


def seed_points(names: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    """(role, weights) of the seeded trials: zeros, each one-hot, uniform 1/K, all-ones.

    A point equal to an earlier one (K = 1: one-hot = uniform = all-ones) is listed once, under
    its first role; :func:`find_point` finds it by its weights for every role.
    """
    k = len(names)
    points = [("zeros", {n: 0.0 for n in names})]
    points += [(f"one_hot:{n}", {m: float(m == n) for m in names}) for n in names]
    points += [("uniform", {n: 1.0 / k for n in names}), ("sum", {n: 1.0 for n in names})]
    seen, unique = set(), []
    for role, weights in points:
        key = tuple(weights[n] for n in names)
        if key not in seen:
            seen.add(key)
            unique.append((role, weights))
    return unique


@dataclass
class TrialRecord:
    number: int
    role: str  # zeros | one_hot:<chunk> | uniform | sum | search | posterior_mean
    weights: dict[str, float]
    objective: float
    seconds_switch: float  # setting the weights in memory
    seconds_eval: float  # computing the objective

    def as_row(self) -> dict:
        return asdict(self)


@dataclass
class PosteriorMean:
    weights: dict[str, float]
    predicted: float  # the GP's posterior mean there, in objective units
    trial: int | None = None  # the trial that measured it
    measured: float | None = None


@dataclass
class SearchResult:
    direction: str
    records: list[TrialRecord]
    best: TrialRecord
    posterior_mean: PosteriorMean | None
    trials_from_store: int  # complete trials found in the study at start
    trials_run: int  # trials evaluated by this call
    study_name: str
    extra: dict = field(default_factory=dict)

    def find_point(self, weights: dict[str, float]) -> TrialRecord | None:
        """The first trial evaluated at exactly ``weights``."""
        for r in self.records:
            if all(r.weights.get(n) == w for n, w in weights.items()):
                return r
        return None


def make_sampler(kind: str, *, seed: int, n_startup_trials: int, deterministic: bool
                 ) -> optuna.samplers.BaseSampler:
    if kind == "gp":
        with warnings.catch_warnings():  # deterministic_objective is flagged experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials,
                                             deterministic_objective=deterministic)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    raise ValueError(f"merge.sampler: unknown sampler {kind!r}; expected 'gp' or 'tpe'")


def _records(study: optuna.Study, names: Sequence[str]) -> list[TrialRecord]:
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        out.append(TrialRecord(
            number=t.number, role=t.user_attrs.get("role", SEARCH),
            weights={n: float(t.params[param_name(n)]) for n in names},
            objective=float(t.value),
            seconds_switch=float(t.user_attrs.get("seconds_switch", math.nan)),
            seconds_eval=float(t.user_attrs.get("seconds_eval", math.nan))))
    return sorted(out, key=lambda r: r.number)


def run_search(evaluate: Evaluate, names: Sequence[str], *, storage_path: str | Path,
               study_name: str, direction: str, w_max: float, trials: int,
               sampler: str = "gp", seed: int = 0, deterministic: bool = True,
               posterior_mean: bool = True) -> SearchResult:
    """Seed, search and (GP) add the posterior-mean trial; resume whatever is stored."""
    names = list(names)
    if not names:
        raise ValueError("no deltas to weigh")
    if w_max < 1.0:
        raise ValueError(f"merge.w_max={w_max} must be >= 1 so that the all-ones seed fits")
    seeds = seed_points(names)
    storage_path = Path(storage_path)
    storage_path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name, storage=f"sqlite:///{storage_path}", direction=direction,
        sampler=make_sampler(sampler, seed=seed, n_startup_trials=len(seeds),
                             deterministic=deterministic),
        load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ValueError(f"stored study {study_name} has direction {study.direction.name}")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("trial %d of %s was left running by a killed run: marked failed",
                    t.number, study_name)
        study.tell(t.number, state=TrialState.FAIL)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    from_store = len(complete)
    done_roles = {t.user_attrs.get("role", SEARCH) for t in complete}
    queued_roles = {t.user_attrs.get("role", SEARCH) for t in waiting}
    for role, weights in seeds:
        if role not in done_roles and role not in queued_roles:
            study.enqueue_trial({param_name(n): w for n, w in weights.items()},
                                user_attrs={"role": role})
    n_seeds_todo = sum(role not in done_roles for role, _ in seeds)
    n_search_done = sum(t.user_attrs.get("role", SEARCH) == SEARCH for t in complete)
    n_todo = n_seeds_todo + max(0, trials - n_search_done)

    def objective(trial: optuna.Trial) -> float:
        weights = {n: trial.suggest_float(param_name(n), 0.0, w_max) for n in names}
        if "role" not in trial.user_attrs:
            trial.set_user_attr("role", SEARCH)
        value, t_switch, t_eval = evaluate(weights)
        trial.set_user_attr("seconds_switch", t_switch)
        trial.set_user_attr("seconds_eval", t_eval)
        if not math.isfinite(value):
            raise ValueError(f"objective is {value} at weights {weights}")
        return value

    if n_todo:
        log.info("study %s: %d trials stored, running %d more", study_name, from_store, n_todo)
        study.optimize(objective, n_trials=n_todo)
    run = n_todo

    pm = None
    if sampler == "gp" and posterior_mean:
        records = _records(study, names)
        stored = next((r for r in records if r.role == POSTERIOR_MEAN), None)
        if stored is not None:
            pm = PosteriorMean(weights=stored.weights, trial=stored.number,
                               measured=stored.objective,
                               predicted=float(study.trials[stored.number].user_attrs["predicted"]))
        else:
            x, predicted = gp_posterior_mean_argmax(
                np.array([[r.weights[n] for n in names] for r in records]),
                np.array([r.objective for r in records]), direction=direction, w_max=w_max,
                deterministic=deterministic, seed=seed)
            weights = {n: float(v) for n, v in zip(names, x)}
            pm = PosteriorMean(weights=weights, predicted=predicted)
            twin = next((r for r in records
                         if all(abs(r.weights[n] - weights[n]) < 1e-9 for n in names)), None)
            if twin is not None:  # the GP's argmax is an evaluated point: nothing new to measure
                pm.trial, pm.measured = twin.number, twin.objective
            else:
                study.enqueue_trial({param_name(n): w for n, w in weights.items()},
                                    user_attrs={"role": POSTERIOR_MEAN, "predicted": predicted})
                study.optimize(objective, n_trials=1)
                run += 1
                last = _records(study, names)[-1]
                pm.trial, pm.measured = last.number, last.objective

    records = _records(study, names)
    sign = 1.0 if direction == "minimize" else -1.0
    best = min(records, key=lambda r: (sign * r.objective, r.number))
    return SearchResult(direction=direction, records=records, best=best, posterior_mean=pm,
                        trials_from_store=from_store, trials_run=run, study_name=study_name)


def gp_posterior_mean_argmax(X: np.ndarray, y: np.ndarray, *, direction: str, w_max: float,
                             deterministic: bool, seed: int = 0, n_candidates: int = 2048
                             ) -> tuple[np.ndarray, float]:
    """Argmax over [0, w_max]^K of the posterior mean of optuna's GP fit on (X, y).

    The same surrogate as ``GPSampler`` (optuna's ``_gp`` code, priors and standardisation):
    inputs scaled to [0, 1], ``sign · y`` standardised and maximised. The posterior mean is
    maximised over the trial points plus ``n_candidates`` seeded uniform points, then refined by
    L-BFGS-B from the 8 best. Returns (weights, predicted objective in original units).
    """
    import scipy.optimize
    import torch
    from optuna._gp import gp as optuna_gp
    from optuna._gp import prior as optuna_prior

    sign = -1.0 if direction == "minimize" else 1.0
    Xn = np.asarray(X, dtype=np.float64) / w_max
    values = sign * np.asarray(y, dtype=np.float64)
    mean, std = values.mean(), max(values.std(), 1e-10)
    gpr = optuna_gp.fit_kernel_params(
        X=Xn, Y=(values - mean) / std, is_categorical=np.zeros(Xn.shape[1], dtype=bool),
        log_prior=optuna_prior.default_log_prior,
        minimum_noise=optuna_prior.DEFAULT_MINIMUM_NOISE_VAR,
        deterministic_objective=deterministic)

    def mu(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return gpr.posterior(torch.from_numpy(np.atleast_2d(x)))[0].numpy()

    def neg_mu_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        xt = torch.from_numpy(x).requires_grad_(True)
        m = gpr.posterior(xt)[0]
        m.backward()
        return -float(m.detach()), -xt.grad.numpy()

    rng = np.random.default_rng(seed)
    candidates = np.vstack([Xn, rng.random((n_candidates, Xn.shape[1]))])
    scores = mu(candidates)
    best_x, best_m = candidates[int(np.argmax(scores))], float(scores.max())
    for start in candidates[np.argsort(-scores)[:8]]:
        res = scipy.optimize.minimize(neg_mu_and_grad, start, jac=True, method="L-BFGS-B",
                                      bounds=[(0.0, 1.0)] * Xn.shape[1])
        if -res.fun > best_m:
            best_x, best_m = np.clip(res.x, 0.0, 1.0), -float(res.fun)
    predicted = sign * (best_m * std + mean)
    return best_x * w_max, float(predicted)
