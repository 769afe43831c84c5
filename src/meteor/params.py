"""params.yaml: its sections, the inheritance between them, and loading the sections a stage reads.

Each section's typed schema lives beside the code that reads it (``meteor.training.config``,
``meteor.refine``, ...): a pydantic model with ``extra="forbid"``, so a misspelt key or a wrong
type or value fails before any work, with a message that names the key (``sft.train.lr: ...``).
A stage validates only the sections it reads (:func:`load_sections`), so its import closure, and
with it its ``dvc.yaml`` deps, holds only its own schemas; ``meteor.all_params`` assembles every
section for tests and for checking a whole file (``python -m meteor.all_params``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

# The top-level sections of params.yaml, in the order of the DAG.
SECTIONS = ("scrape", "student", "base", "generation", "teacher", "judge", "guideline", "distill",
            "sft", "refine", "self_train", "ifd_select", "merge", "evaluate")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A section that inherits every key it does not set from another, so params.yaml writes each shared
# value once: the judge is the teacher unless told otherwise, and refine keeps training the sft
# adapter, whose LoRA shape it must share. (YAML anchors / merge keys cannot do this: `dvc exp run
# -S teacher.x=...` rewrites the file with every merged key copied into the child, so the override
# silently skips the judge and the link is gone.) A stage reading a child must also list its parent
# under `params:` in dvc.yaml (tests/test_dvc_deps.py checks it).
INHERITS = {"judge": "teacher", "refine.train.lora": "sft.train.lora",
            # self_train continues refine's adapter (resolved after refine's own line above)
            "self_train.train.lora": "refine.train.lora"}


def _node(data: dict, dotted: str) -> dict | None:
    for key in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data if isinstance(data, dict) else None


def resolve_inheritance(data: dict) -> dict:
    """``data`` (a raw params mapping) with each :data:`INHERITS` child completed by its parent's
    keys (the child's own keys win; a key's whole value is taken, e.g. a whole ``prices`` table)."""
    if not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    for child, parent in INHERITS.items():
        inherited = _node(data, parent)
        if not inherited:
            continue
        *path, last = child.split(".")
        node = data
        for key in path:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            own = node.get(last)
            if own is None:
                own = {}
            if isinstance(own, dict):
                node[last] = {**copy.deepcopy(inherited), **own}
    return data


class ParamsError(ValueError):
    """A params.yaml problem, with every offending key named."""


def read_params(path: str | Path = "params.yaml") -> dict:
    """The raw mapping of ``path``, inheritance resolved; unknown sections are refused."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of stage sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: invalid params\n" + "\n".join(f"  {key}: unknown key"
                                                                  for key in unknown))
    return resolve_inheritance(raw)


def validate(path: str | Path, model: type[BaseModel], data: dict, prefix: str = "") -> BaseModel:
    """``model`` validated from ``data``; a :class:`ParamsError` naming each bad key otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {key}: {msg}")
        raise ParamsError(f"{path}: invalid params\n" + "\n".join(lines)) from None


def load_sections(path: str | Path = "params.yaml", **schemas: type[Section]) -> SimpleNamespace:
    """The sections a stage reads, each validated by its schema: ``load_sections(sft=SftParams,
    student=StudentParams).sft.train.lr``. A section missing from the file takes its defaults."""
    raw = read_params(path)
    unknown = sorted(set(schemas) - set(SECTIONS))
    if unknown:
        raise ValueError(f"no such params section: {unknown}")
    problems, sections = [], {}
    for name, schema in schemas.items():
        data = raw.get(name)
        try:
            sections[name] = validate(path, schema, {} if data is None else data, prefix=name)
        except ParamsError as e:
            problems.extend(str(e).splitlines()[1:])
    if problems:
        raise ParamsError(f"{path}: invalid params\n" + "\n".join(problems))
    return SimpleNamespace(**sections)
