"""The layout's rules, over the import graph: the steps stand side by side.

A step is a module directly under tasks/ that defines an `@task`. Every import counts —
top-level, function-local, under `if TYPE_CHECKING:` — as Python's own parser (`ast`) sees
it; relative imports are resolved. The rules (docs/caching.md, DESIGN.md):

- a step imports no other step (the records they hand each other are in tasks.contracts);
- a helper (any other module under tasks/) imports no step;
- profiles/ imports nothing from tasks/;
- the modules a cache key leaves out as descriptive (tasks.cache.keys' DATA_MODULES and
  ERROR_MODULES) import no loraflow module but each other, so leaving them out of a step's
  code key hides no helper.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tasks.cache.keys import DATA_MODULES, ERROR_MODULES

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "profiles", "flows")


def _modules() -> dict[str, Path]:
    """Dotted name → source file, for every module of the loraflow packages."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(loraflow module imported, line) for every import statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module
                       for a in node.names]
        else:
            continue
        for target in targets:
            # `import pkg.mod.sub` names the deepest module that exists.
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target:
                out.append((target, node.lineno))
    return out


def _defines_a_task(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                func = dec.func if isinstance(dec, ast.Call) else dec
                if (isinstance(func, ast.Name) and func.id == "task") or \
                        (isinstance(func, ast.Attribute) and func.attr == "task"):
                    return True
    return False


STEPS = {name for name, path in MODULES.items()
         if name.count(".") == 1 and name.startswith("tasks.") and path.name != "__init__.py"
         and _defines_a_task(path)}
HELPERS = {name for name in MODULES if name.split(".")[0] == "tasks" and name not in STEPS}


def _where(name: str, line: int) -> str:
    return f"{MODULES[name].relative_to(REPO)}:{line}"


def test_the_steps_are_found():
    # The detection itself must work, or every rule below would pass vacuously.
    assert {"tasks.preflight", "tasks.download", "tasks.dataset", "tasks.train",
            "tasks.publish", "tasks.verify"} <= STEPS
    assert not STEPS & {"tasks.contracts", "tasks.errors", "tasks.settings"}
    assert {"tasks.cache.keys", "tasks.contracts", "tasks.training.worker"} <= HELPERS


def test_no_step_imports_another_step():
    offenders = [f"{_where(step, line)}: {step} imports the step {target}"
                 for step in sorted(STEPS) for target, line in _imports(step, MODULES[step])
                 if target in STEPS and target != step]
    assert not offenders, "\n".join(offenders)


def test_no_helper_imports_a_step():
    offenders = [f"{_where(helper, line)}: the helper {helper} imports the step {target} "
                 "(move what it needs into a helper or tasks.contracts)"
                 for helper in sorted(HELPERS)
                 for target, line in _imports(helper, MODULES[helper]) if target in STEPS]
    assert not offenders, "\n".join(offenders)


def test_profiles_import_nothing_from_tasks():
    offenders = [f"{_where(name, line)}: {name} imports {target}"
                 for name in sorted(MODULES) if name.split(".")[0] == "profiles"
                 for target, line in _imports(name, MODULES[name])
                 if target.split(".")[0] == "tasks"]
    assert not offenders, "\n".join(offenders)


def test_modules_left_out_of_code_keys_import_no_helper():
    descriptive = DATA_MODULES | ERROR_MODULES
    assert descriptive <= set(MODULES)
    offenders = [f"{_where(name, line)}: {name} imports {target}"
                 for name in sorted(descriptive)
                 for target, line in _imports(name, MODULES[name])
                 if target not in descriptive and target.split(".")[0] in PACKAGES
                 and MODULES[target].name != "__init__.py"]
    assert not offenders, "\n".join(offenders)
