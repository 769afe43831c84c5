"""The stage runtime: what every stage script needs besides its method.

A stage script reads as its method (load inputs, call the library, write outputs); the policy
around it lives here, once:

- logging set up the same way for every stage;
- the params sections the stage reads, validated (:func:`meteor.params.load_sections`);
- seeding, deterministic kernels and fixed threads (:func:`meteor.utils.seed_everything`);
- whether this process writes: under ``accelerate launch`` every process runs the script and only
  the main one (global rank 0) writes outputs and metrics;
- the stage's wall-clock time and, for the stages that train, the facts that decide bitwise
  results (:func:`meteor.utils.reproducibility_info`);
- completeness: a stage that ran but must not count as done (a teacher budget stopped it, too many
  calls failed) records why with :meth:`Stage.incomplete`; :meth:`Stage.finish` logs it and
  returns the exit status, non-zero so DVC does not record the run as done. Outputs and metrics
  are written first, and finished teacher calls are in the cache, so a re-run resumes.

The device is not chosen here: stages that load a model use
:func:`meteor.student.load.default_device` (this module stays free of torch, so the stages that
only call a teacher or write a report do not import it).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

from meteor.params import Section, load_sections
from meteor.utils import reproducibility_info, seed_everything, setup_logging

EXIT_INCOMPLETE = 3  # the stage ran and wrote its outputs, but must run again (see finish)


class Stage:
    """One run of one stage: ``stage = Stage("sft", sft=SftParams, student=StudentParams)``, then
    ``stage.params.sft``, ``stage.seed(...)``, ``stage.seconds()``, ``stage.finish()``."""

    def __init__(self, name: str, *, params_path: str | Path = "params.yaml",
                 **sections: type[Section]):
        setup_logging()
        self.name = name
        self.log = logging.getLogger(name)
        self._start = time.perf_counter()
        self.params: SimpleNamespace = load_sections(params_path, **sections)
        self.problems: list[str] = []

    def seed(self, seed: int) -> None:
        """Seed every generator and fix threads and kernels; call it before any tensor work."""
        seed_everything(seed)

    @property
    def is_main(self) -> bool:
        """Whether this process writes (the only one, or rank 0 of ``accelerate launch``)."""
        return int(os.environ.get("RANK", "0")) == 0

    def seconds(self) -> float:
        """Wall-clock seconds since the stage started, rounded for the metrics."""
        return round(time.perf_counter() - self._start, 1)

    def reproducibility(self) -> dict:
        """What determines bitwise results besides code, data, params and seed."""
        return reproducibility_info()

    def incomplete(self, reason: str) -> None:
        """Record why this run must not count as done (written to the log by :meth:`finish`)."""
        self.problems.append(reason)

    @property
    def complete(self) -> bool:
        return not self.problems

    def finish(self, *, see: str | None = None) -> int:
        """The exit status: 0, or :data:`EXIT_INCOMPLETE` after logging what was incomplete
        (``see``: where the failed calls' errors are written)."""
        if not self.problems:
            return 0
        where = f"; see {see}" if see else ""
        self.log.error("incomplete: %s. Outputs and metrics are written; re-run (after raising the "
                       "budget or fixing the endpoint): finished calls come from the cache%s.",
                       "; ".join(self.problems), where)
        return EXIT_INCOMPLETE
