"""Cache keys: `<step>-<sha256>` over what determines a step's output, and the code part
of it (the step's module and the loraflow helpers it really runs).

What a step's code key covers (`code_closure`) — the rule:

- the step's module and every loraflow module it imports, directly or through other
  helpers, function-local (lazy) imports included, plus a module it starts by name
  (torchrun's `-m tasks.training.worker`, `importlib.import_module`);
- not the modules that only describe data or errors (`DATA_MODULES`, `ERROR_MODULES`):
  - `tasks.contracts` (the records steps hand each other) and `profiles.schema` (the
    profile): a change to a record or a profile field shows in the *values* a key hashes
    (a manifest's fields, `profile.lora.model_dump()`, a default that moved), so their
    classes are left out. A constant or function a closure module names from them
    (`from tasks.contracts import RECORD`) is data or code the step uses — the file name
    it writes, the patterns it downloads — and is hashed on its own, with the module-level
    names it refers to (`tasks.contracts:RECORD` in the list); a module imported whole
    contributes all of its constants and functions;
  - `tasks.errors` and `profiles.errors`: an error aborts a step (or has it retried), so
    it never shapes a cached output; rewording a message re-keys nothing;
  - the machinery that decides *whether* a step runs, not what it produces
    (`RUNNER_MODULES`: the cache policy, the cross-host locks, the retry policy): an edit
    there must not re-download a base or retrain every cached run;
- a package `__init__.py` that holds only a docstring runs nothing and is left out; one
  with code is in the closure of every module under it (Python runs it on import).

So an edit re-keys exactly the steps that run the edited code, and a later step re-keys
through the keys and manifests it consumes (train hashes the dataset's key, not the
dataset step's code). Any byte of a covered module counts, comments too: simple, never
stale. Records keep their methods to accessors of their own fields; logic that shapes an
output belongs in a helper, where it is keyed.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

LORAFLOW_PACKAGES = ("tasks", "profiles", "flows")
STEP_DIRS = {"download": "downloads", "dataset": "datasets", "train": "runs"}
# Modules that only describe data: a key covers the constants and functions a closure
# module names from them, never their classes (records and profile sections).
DATA_MODULES = frozenset({"tasks.contracts", "profiles.schema"})
# Modules that only describe errors: never in a closure.
ERROR_MODULES = frozenset({"tasks.errors", "profiles.errors"})
# Modules that decide whether a step runs (cache hit, lock, retry), not what it produces:
# never in a closure.
RUNNER_MODULES = frozenset({"tasks.cache.policy", "tasks.cache.locks", "tasks.retry"})


def stable_hash(*parts: Any) -> str:
    """sha256 over the canonical JSON of the parts (pydantic models dumped first).

    Args:
        *parts: JSON-able values or pydantic models.

    Returns:
        The hex digest.

    Raises:
        TypeError: a part is a `Path` (a path names a file, it is not its content).
    """
    def norm(obj: Any) -> Any:
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json")
        if isinstance(obj, Path):
            raise TypeError("paths are not content: hash the file, not its name")
        return obj

    blob = json.dumps([norm(p) for p in parts], sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(step: str, inputs: dict) -> str:
    """`<step>-<sha256 of the inputs>`: the Prefect cache key and the directory name.

    The step prefix makes `results/` and `locks/` readable and lets `loraflow cache`
    tell the steps apart without reading anything.

    Args:
        step: the step's name (`download`, `dataset`, `train`, …).
        inputs: everything that determines the step's output (see the steps' `*_inputs`).

    Returns:
        The key.
    """
    return f"{step}-{stable_hash(step, inputs)}"


def step_of_key(key: str) -> Optional[str]:
    """The step a key belongs to, or None for a key no cached step makes."""
    step = key.split("-", 1)[0]
    return step if step in STEP_DIRS else None


def _package_root(top: str) -> Optional[Path]:
    """Directory that holds the top-level package `top`, as the import system finds it
    (so a copy of the tree earlier on sys.path is the one hashed)."""
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent


def _module_origin(name: str) -> Optional[Path]:
    """The source file of a loraflow module, found on disk without importing it."""
    parts = name.split(".")
    if parts[0] not in LORAFLOW_PACKAGES or not all(p.isidentifier() for p in parts):
        return None
    root = _roots.get(parts[0]) or _roots.setdefault(parts[0], _package_root(parts[0]))
    if root is None:
        return None
    base = root.joinpath(*parts)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


_roots: dict[str, Optional[Path]] = {}
_parsed: dict[tuple, tuple[str, frozenset]] = {}
_data_names: dict[tuple, dict[str, tuple[str, frozenset]]] = {}
_runs_nothing: dict[tuple, bool] = {}


_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)"
                     r"|import[ \t]+([^\n#;]+))", re.M)
_DOTTED = r"[\"']((?:" + "|".join(LORAFLOW_PACKAGES) + r")(?:\.[A-Za-z_]\w*)+)[\"']"
# A module run by name rather than imported: `python -m <module>` (torchrun's workers),
# importlib.import_module("<module>").
_STARTED = re.compile(r"[\"']-m[\"']\s*,\s*" + _DOTTED + r"|import_module\(\s*" + _DOTTED)


def _imported_names(source: str, package: str) -> set[str]:
    """What the import statements of `source` name: `module` for a module imported whole,
    `module:NAME` for a name taken from a module (`from module import NAME`) — whether NAME
    is itself a submodule is decided later, on disk. Function-local (lazy) imports are
    included — tasks import torch and loraflow helpers inside functions — and so are the
    modules `source` starts by name (`"-m", "pkg.mod"`, `import_module("pkg.mod")`).

    A text scan, not a parse (a parse of a step's closure costs ~0.1 s, too much for a
    cached run); an import-like line inside a docstring only adds a module: over-keying,
    never under.
    """
    found: set[str] = set()
    for m in _IMPORT.finditer(source):
        if m.group(3) is not None:
            found.update(part.split()[0] for part in m.group(3).split(",") if part.split())
            continue
        module, names = m.group(1), m.group(2).strip("() \t\n")
        dots = len(module) - len(module.lstrip("."))
        if dots:
            base = package.split(".")
            base = base[:len(base) - (dots - 1)]
            module = ".".join(base + ([module[dots:]] if module[dots:] else []))
        found.update(f"{module}:{part.split()[0]}" for part in names.split(",")
                     if part.split() and part.split()[0] != "*")
        if "*" in names.split(","):
            found.add(module)
    for m in _STARTED.finditer(source):
        found.add(m.group(1) or m.group(2))
    return found


def _resolve(ref: str) -> Optional[str]:
    """A scanned reference → a closure entry: a loraflow module (`pkg.mod`), a name in a
    loraflow module (`pkg.mod:NAME`), or None for anything else (the standard library,
    torch, a name that is neither)."""
    module, _, name = ref.partition(":")
    if module.split(".")[0] not in LORAFLOW_PACKAGES or _module_origin(module) is None:
        return None
    if name and _module_origin(f"{module}.{name}") is not None:
        return f"{module}.{name}"  # `from pkg import mod`: the module, whole
    return ref


def _hash_and_imports(name: str, path: Path) -> tuple[str, frozenset]:
    """(sha256 of the file, loraflow modules and names it imports), memoized by
    (path, stat)."""
    st = path.stat()
    memo_key = (name, str(path), st.st_size, st.st_mtime_ns)
    if memo_key in _parsed:
        return _parsed[memo_key]
    source = path.read_bytes()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = _imported_names(source.decode("utf-8", errors="replace"), package)
    ours = frozenset(r for r in map(_resolve, found) if r is not None)
    result = (hashlib.sha256(source).hexdigest(), ours)
    _parsed[memo_key] = result
    return result


def _named_definitions(path: Path) -> dict[str, tuple[str, frozenset]]:
    """For a data module: each module-level constant and function → (sha256 of its
    source, the module-level names it refers to). Classes are left out. Memoized by stat
    (data modules are few and small: a parse costs milliseconds)."""
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    if memo_key in _data_names:
        return _data_names[memo_key]
    source = path.read_text(encoding="utf-8", errors="replace")
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    table: dict[str, tuple[str, frozenset]] = {}
    top = set()
    for node in tree.body:
        targets: list[str] = []
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            targets = [node.name]
        elif isinstance(node, ast.ClassDef):
            top.add(node.name)
            continue
        top.update(targets)
        if not targets:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        segment = "".join(lines[first - 1:node.end_lineno])
        refs = frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
        for target in targets:
            table[target] = (hashlib.sha256(segment.encode()).hexdigest(), refs)
    # Keep only references to other module-level constants and functions.
    table = {k: (digest, frozenset(r for r in refs if r in table and r != k))
             for k, (digest, refs) in table.items()}
    _data_names[memo_key] = table
    return table


def _runs_no_code(path: Path) -> bool:
    """True for a package `__init__.py` that holds nothing but a docstring (or nothing)."""
    if path.name != "__init__.py":
        return False
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    if memo_key not in _runs_nothing:
        body = ast.parse(path.read_text(encoding="utf-8", errors="replace")).body
        _runs_nothing[memo_key] = all(
            isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, str) for n in body)
    return _runs_nothing[memo_key]


def code_closure(*module_names: str) -> dict[str, str]:
    """The code a step runs, by the rule in this module's docstring: module (or
    `data_module:NAME`) → sha256 of its source.

    Args:
        *module_names: the step's module(s), e.g. `"tasks.download"`.

    Returns:
        Entry → sha256, sorted by entry.

    Raises:
        ValueError: a module named here has no source file.
    """
    for name in module_names:
        if _module_origin(name) is None:
            raise ValueError(f"no source for module {name}")
    seen: dict[str, str] = {}
    visited: set[str] = set()
    todo = list(module_names)
    while todo:
        ref = todo.pop()
        if ref in visited:
            continue
        visited.add(ref)
        module, _, attr = ref.partition(":")
        if module in ERROR_MODULES or module in RUNNER_MODULES:
            continue
        path = _module_origin(module)
        if path is None:
            raise ValueError(f"no source for module {module}")
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parents run first
        if module in DATA_MODULES:
            table = _named_definitions(path)
            names = [attr] if attr else list(table)
            for n in names:
                if n in table:
                    seen[f"{module}:{n}"] = table[n][0]
                    todo.extend(f"{module}:{r}" for r in table[n][1])
            # What the data module itself imports (nothing of loraflow's today).
            todo.extend(_hash_and_imports(module, path)[1])
            continue
        if attr:  # a name taken from a code module: the module, whole
            todo.append(module)
            continue
        digest, imports = _hash_and_imports(module, path)
        if not _runs_no_code(path):
            seen[module] = digest
        todo.extend(imports)
    return dict(sorted(seen.items()))


def code_version(*module_names: str) -> str:
    """16 hex digits over `code_closure(*module_names)`.

    Prefect's TASK_SOURCE only sees the task body; a step's helpers live in its module
    and in the modules it imports, so an edit to one of those re-keys the step. The
    imports are read from the source (no import happens), function-local ones included.

    Args:
        *module_names: the step's module(s).

    Returns:
        The version.
    """
    return stable_hash(code_closure(*module_names))[:16]


def code_inputs(*module_names: str) -> dict:
    """The code part of a step's key inputs: the version and what it covers.

    Args:
        *module_names: the step's module(s).

    Returns:
        `{"version": …, "modules": [...]}`; `modules` lists module names and, for data
        modules, `module:NAME` entries (see this module's docstring).
    """
    closure = code_closure(*module_names)
    return {"version": stable_hash(closure)[:16], "modules": sorted(closure)}


# The cached steps whose keys carry a code part (verify is keyed by what it checks: the
# Hub commit and the adapter's sha256).
KEYED_STEPS = ("tasks.download", "tasks.dataset", "tasks.train", "tasks.local_check",
               "tasks.samples")


def describe_closures(steps: tuple[str, ...] = KEYED_STEPS) -> str:
    """What each step's code key covers, one entry a line (docs/caching.md pastes it;
    `python -m tasks.cache.keys` prints it).

    Args:
        steps: the step modules to list.

    Returns:
        The listing.
    """
    blocks = []
    for step in steps:
        entries = code_closure(step)
        blocks.append(f"{step} ({len(entries)})\n" + "".join(f"  {e}\n" for e in entries))
    return "\n".join(blocks)


if __name__ == "__main__":
    print(describe_closures(), end="")
