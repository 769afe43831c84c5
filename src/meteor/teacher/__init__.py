"""Teacher and judge: one interface (:class:`~meteor.teacher.base.Teacher`), three backends.

``make_teacher(params.teacher)`` or ``make_teacher(params.judge, section="judge")`` builds the
backend named in params. Backends are imported lazily, so the offline default needs neither the
``openai`` client nor a model. Bad settings fail here, before any call, naming the key
(``teacher.base_url``, ``judge.model``); range checks (``teacher.max_concurrency: Input should
be greater than or equal to 1``) are done earlier by :func:`meteor.params.load_params`.
"""

from __future__ import annotations

from meteor.teacher.config import TeacherParams
from meteor.teacher.base import Teacher


def make_teacher(params: TeacherParams, *, section: str = "teacher",
                 stage: str | None = None) -> Teacher:
    """The teacher (or judge, with ``section="judge"``) described by ``params``.

    ``stage`` (the calling stage's name) makes ``budget_usd`` cumulative over that stage's runs
    until one completes (see :class:`~meteor.teacher.chat.ChatTeacher`); without it the budget
    counts this run only."""
    if params.backend == "offline":
        from meteor.teacher.offline import OfflineTeacher

        return OfflineTeacher(params)

    from meteor.teacher.chat import ChatTeacher

    if params.backend == "openai":
        from meteor.teacher.openai_backend import OpenAIBackend

        backend = OpenAIBackend(params, section=section)
    elif params.backend == "local":
        from meteor.teacher.local_backend import LocalBackend

        backend = LocalBackend(params, section=section)
    else:  # pydantic's Literal already rejects this; kept for code that bypasses validation
        raise ValueError(f"{section}.backend: unknown backend {params.backend!r}")
    return ChatTeacher(params, backend, budget_scope=f"{stage}/{section}" if stage else None)
