"""The ``local`` backend: a Hugging Face chat model (local path or hub id) in this process.

Conversations are generated in batches of ``batch_size`` with the student's generation utility
(chat template, left padding, new tokens only); each batch is reported as soon as it is done, so
the cache commits it before the next one starts. Greedy when ``temperature`` is 0, else seeded
sampling. There is no constrained JSON decoding: structured replies rely on the prompt and the
teacher's validate-and-re-ask loop. Token usage is counted with the model's tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from meteor.params import ParamsError
from meteor.teacher.config import TeacherParams
from meteor.teacher.chat import BUDGET, CallFailure, ChatBackend, Completion, Outcome

log = logging.getLogger(__name__)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


class LocalBackend(ChatBackend):
    kind = "local"

    def __init__(self, params: TeacherParams, *, section: str = "teacher"):
        if params.model == "offline-reference":
            raise ParamsError(f"{section}.model: 'offline-reference' is the offline backend's "
                              f"placeholder; set {section}.model to a local model path or hub id")
        if _looks_like_path(params.model) and not Path(params.model).expanduser().is_dir():
            raise ParamsError(f"{section}.model: local model directory not found: {params.model}")
        self.params = params
        self.model = params.model
        self._section = section
        self._loaded = None  # (model, tokenizer), loaded on first use
        self._identity: str | None = None

    def _source(self) -> str:
        return str(Path(self.model).expanduser()) if _looks_like_path(self.model) else self.model

    @property
    def identity(self) -> str:
        """What exactly is loaded: a local directory's content hash, or the hub commit the id
        resolves to in the local hub cache (a retrained model at the same path is a new key)."""
        if self._identity is None:
            from meteor.student.load import resolve_revision

            rev = resolve_revision(self._source())
            self._identity = (rev["revision"] if rev["kind"] == "local"
                              else f"{rev['source']}@{rev['revision']}")
        return self._identity

    def _load(self):
        if self._loaded is None:
            from meteor.student.load import load_student

            log.info("loading local %s model %s", self._section, self.model)
            try:
                model, tokenizer = load_student(self._source())
            except OSError as e:
                raise ParamsError(f"{self._section}.model: cannot load {self.model!r}: {e}") from e
            model.eval()
            self._loaded = (model, tokenizer)
        return self._loaded

    def complete(
        self,
        conversations: Sequence[list[dict]],
        *,
        json_mode: bool,
        may_send: Callable[[], bool],
        on_done: Callable[[int, Outcome], None],
    ) -> None:
        from meteor.student.generate import generate

        model, tokenizer = self._load()
        p = self.params
        sampling = p.temperature > 0
        for start in range(0, len(conversations), p.batch_size):
            batch = range(start, min(start + p.batch_size, len(conversations)))
            if not may_send():
                for i in batch:
                    on_done(i, CallFailure(BUDGET, 0))
                continue
            texts = generate(model, tokenizer, [conversations[i] for i in batch],
                             max_new_tokens=p.max_tokens, batch_size=p.batch_size,
                             do_sample=sampling, temperature=p.temperature if sampling else 1.0,
                             seed=0, progress=False)
            for i, text in zip(batch, texts):
                on_done(i, Completion(text, self._usage(tokenizer, conversations[i], text)))

    @staticmethod
    def _usage(tokenizer, conversation: list[dict], text: str) -> dict[str, int]:
        prompt_ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
        completion_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(completion_ids)}

    def close(self) -> None:
        self._loaded = None
