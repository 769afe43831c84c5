"""Each dvc.yaml stage's code deps are exactly the code it runs: no more, no less.

For every stage, the script named in ``cmd`` is parsed with ``ast`` and its import closure inside
the ``meteor`` package is followed, counting imports inside functions too (backends are imported
lazily, and which one runs depends on params) and the ``__init__.py`` of every package on the way
(Python runs it before any submodule). The test fails when

(a) a module of the closure is not covered by a deps entry (the file, or a directory above it);
(b) a deps entry under ``src/`` or ``stages/`` covers no module of the closure;
(c) a directory entry covers a module outside the closure (list the files instead), or a module
    on the allow-list below (or a package ``__init__.py`` holding only a docstring) is listed;
(d) the package's modules import each other in a cycle (an import inside a function counts).

A changed dependency re-runs the stage, so (b) and (c) keep small edits from re-running stages
they cannot affect. New stages are held to the same rules.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "meteor"

# Modules in every closure that are deliberately not deps, each with why its content cannot change
# a stage's outputs. Empty: every module a stage imports holds something that can (the params
# root holds the inheritance, each schema its validators and defaults), so each is a dep.
ALLOWED_UNLISTED: dict[str, str] = {}


def docstring_only(path: Path) -> bool:
    """A file holding nothing but a docstring (a package marker like ``student/__init__.py``)."""
    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                  for n in body)


def allowed_unlisted(module: Path) -> str | None:
    """Why ``module`` may be left out of deps, or None when it must be listed."""
    if module.as_posix() in ALLOWED_UNLISTED:
        return ALLOWED_UNLISTED[module.as_posix()]
    if module.name == "__init__.py" and docstring_only(ROOT / module):
        return "a package marker holding only a docstring"
    return None


def stages() -> dict[str, dict]:
    """Each stage's definition; a ``foreach`` group (``evaluate``) by its ``do`` template."""
    return {name: stage.get("do", stage)
            for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}


def script_of(stage: dict) -> Path:
    scripts = [w for w in shlex.split(stage["cmd"]) if w.endswith(".py")]
    assert len(scripts) == 1, f"cannot tell the script of cmd {stage['cmd']!r}"
    return ROOT / scripts[0]


def module_file(name: str) -> Path | None:
    """The file of module ``meteor.x.y`` (``x/y.py`` or ``x/y/__init__.py``), None if none."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(path: Path) -> str | None:
    """Dotted name of the package ``path`` belongs to (for relative imports), None outside src/."""
    try:
        rel = path.relative_to(SRC)
    except ValueError:
        return None
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])


def imported_modules(path: Path, package_edges: bool = True) -> set[str]:
    """Every ``meteor`` module ``path`` imports, anywhere in the file (functions included).
    ``from pkg import submodule`` counts ``pkg`` too unless ``package_edges`` is false (it runs
    ``pkg/__init__.py`` but takes nothing from it)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path)
                assert package is not None, f"relative import outside src/ in {path}"
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from meteor import prompts` imports the submodule meteor.prompts
            submodules = {f"{module}.{alias.name}" for alias in node.names
                          if module_file(f"{module}.{alias.name}") is not None}
            names.update(submodules)
            if package_edges or len(submodules) < len(node.names):
                names.add(module)
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def closure(script: Path) -> set[Path]:
    """Files of every meteor module reachable from ``script`` (package ``__init__``s included)."""
    seen: set[str] = set()
    todo = list(imported_modules(script))
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            mod = ".".join(parts[:i])
            if mod in seen:
                continue
            file = module_file(mod)
            assert file is not None, f"{script.name} reaches {mod}, which has no file under src/"
            seen.add(mod)
            todo.extend(imported_modules(file))
    return {module_file(m).relative_to(ROOT) for m in seen}


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps", []) if d.startswith(("src/", "stages/"))]


def covers(entry: str, module: Path) -> bool:
    return module.as_posix() == entry or module.as_posix().startswith(entry.rstrip("/") + "/")


@pytest.mark.parametrize("name", list(stages()))
def test_code_deps_are_exactly_the_import_closure(name):
    stage = stages()[name]
    script = script_of(stage)
    needed = closure(script) | {script.relative_to(ROOT)}
    deps = code_deps(stage)
    problems = []
    for module in sorted(needed):
        reason = allowed_unlisted(module)
        if reason is not None:
            if module.as_posix() in deps:
                problems.append(f"{module} is listed but need not be ({reason}): remove it")
            continue
        if not any(covers(d, module) for d in deps):
            problems.append(f"missing dep: {module} (imported by the closure of {script.name})")
    for entry in deps:
        path = ROOT / entry
        if not path.exists():
            problems.append(f"dep {entry} does not exist")
            continue
        covered = [m for m in needed if covers(entry, m)]
        if not covered:
            problems.append(f"dep {entry} is code the stage never imports: remove it")
        if path.is_dir():
            extra = sorted(p.relative_to(ROOT).as_posix() for p in path.rglob("*.py")
                           if p.relative_to(ROOT) not in needed
                           and allowed_unlisted(p.relative_to(ROOT)) is None)
            if extra:
                problems.append(f"dep {entry}/ also covers {extra}, which the stage never "
                                "imports: list the imported files instead")
    assert not problems, f"stage {name}:\n  " + "\n  ".join(problems)


def test_every_stage_runs_the_kernel_pins():
    """meteor/__init__.py pins the CPU kernels, so it and meteor/kernels.py are in every closure
    and every stage's deps: a changed pin changes bits, so it re-runs everything."""
    for name, stage in stages().items():
        assert {"src/meteor/__init__.py", "src/meteor/kernels.py"} <= set(code_deps(stage)), name
        assert {"src/meteor/__init__.py", "src/meteor/kernels.py"} <= {
            p.as_posix() for p in closure(script_of(stage))}, name


def test_nothing_reads_the_package_version():
    for path in [*SRC.rglob("*.py"), *(ROOT / "stages").rglob("*.py")]:
        text = path.read_text()  # nothing reads the package's own version (other libraries' may be)
        assert f"{PACKAGE}.__version__" not in text and "import __version__" not in text, path


def test_the_closure_follows_lazy_and_package_imports():
    # distill's teacher backends are imported inside make_teacher; `local` loads a HF model.
    distill = {p.as_posix() for p in closure(ROOT / "stages" / "distill.py")}
    assert {"src/meteor/teacher/__init__.py", "src/meteor/teacher/local_backend.py",
            "src/meteor/student/load.py", "src/meteor/student/generate.py",
            "src/meteor/student/__init__.py", "src/meteor/teacher/prompts.py"} <= distill
    # sft reaches the student prompt through training/data.py, but no teacher code.
    sft = {p.as_posix() for p in closure(ROOT / "stages" / "sft.py")}
    assert "src/meteor/prompts.py" in sft and "src/meteor/utils.py" in sft
    assert not any(p.startswith("src/meteor/teacher/") for p in sft)


def _reads(params: list, key: str) -> bool:
    """Whether a `params:` list covers ``key`` (the key itself, or a section above it)."""
    names = [p if isinstance(p, str) else next(iter(p)) for p in params]
    return any(key == n or key.startswith(n + ".") for n in names)


@pytest.mark.parametrize("name", list(stages()))
def test_a_stage_reading_an_inheriting_section_lists_its_parent(name):
    # judge takes every key it does not set from teacher (meteor.params.INHERITS): a stage that
    # reads the judge must also track the teacher's values, or a change there would not re-run it.
    from meteor.params import INHERITS

    params = stages()[name].get("params", [])
    names = [p if isinstance(p, str) else next(iter(p)) for p in params]
    for child, parent in INHERITS.items():
        reads_child = any(child == n or child.startswith(n + ".") or n.startswith(child + ".")
                          for n in names)
        if reads_child:
            assert _reads(params, parent), f"stage {name} reads {child}: list {parent} in params"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycles() -> list[list[str]]:
    """Cycles among the package's modules through their own import statements (a package's
    ``__init__`` run on the way to a submodule is not an edge: it imports nothing back here)."""
    graph = {}
    for path in SRC.joinpath(PACKAGE).rglob("*.py"):
        name = _module_name(path)
        graph[name] = {m for m in imported_modules(path, package_edges=False)
                       if m != name and module_file(m) is not None}
    cycles, state = [], {}  # state: 1 on the DFS stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycles():
    assert import_cycles() == []


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    # a control: two modules importing each other (one inside a function) form a cycle
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""marker"""\n')
    (pkg / "a.py").write_text("from meteor.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from meteor import a\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    assert import_cycles() == [["meteor.a", "meteor.b", "meteor.a"]]
