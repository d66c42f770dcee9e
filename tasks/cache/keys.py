"""Cache keys: `<step>-<sha256>` over what determines a step's output, and the code part
of it (the step's module and the loraflow helpers it really runs)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

LORAFLOW_PACKAGES = ("tasks", "profiles", "flows")
STEP_DIRS = {"download": "downloads", "dataset": "datasets", "train": "runs"}


def stable_hash(*parts: Any) -> str:
    """sha256 over the canonical JSON of the parts (pydantic models dumped first)."""
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
    """
    return f"{step}-{stable_hash(step, inputs)}"


def step_of_key(key: str) -> Optional[str]:
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


_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)"
                     r"|import[ \t]+([^\n#;]+))", re.M)


def _imported_names(source: str, package: str) -> set[str]:
    """Modules named by the import statements of `source`, function-local (lazy) ones
    included — tasks import torch and loraflow helpers inside functions. A text scan,
    not a parse (a parse of a step's closure costs ~0.1 s, too much for a cached run);
    an import-like line inside a docstring only adds a module: over-keying, never under."""
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
        found.add(module)
        found.update(f"{module}.{part.split()[0]}" for part in names.split(",")
                     if part.split())
    return found


def _hash_and_imports(name: str, path: Path) -> tuple[str, frozenset]:
    """(sha256 of the file, loraflow modules it imports), memoized by (path, stat)."""
    st = path.stat()
    memo_key = (name, str(path), st.st_size, st.st_mtime_ns)
    if memo_key in _parsed:
        return _parsed[memo_key]
    source = path.read_bytes()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = _imported_names(source.decode("utf-8", errors="replace"), package)
    ours = frozenset(m for m in found
                     if m.split(".")[0] in LORAFLOW_PACKAGES and _module_origin(m))
    result = (hashlib.sha256(source).hexdigest(), ours)
    _parsed[memo_key] = result
    return result


def code_closure(*module_names: str) -> dict[str, str]:
    """module → sha256 of its source, for the modules and every loraflow module they
    import, directly or not (package `__init__` files included)."""
    seen: dict[str, str] = {}
    todo = list(module_names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_origin(name)
        if path is None:
            raise ValueError(f"no source for module {name}")
        digest, imports = _hash_and_imports(name, path)
        seen[name] = digest
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        todo.extend(imports)
    return dict(sorted(seen.items()))


def code_version(*module_names: str) -> str:
    """Hash of the source of the given modules and of the loraflow modules they import.

    Prefect's TASK_SOURCE only sees the task body; a step's helpers live in its module
    and in the modules it imports (e.g. tasks.download uses tasks.preflight's
    SNAPSHOT_PATTERNS), so any edit to one of those re-keys the step. The imports are
    read from the source (no import happens), function-local imports included.
    """
    return stable_hash(code_closure(*module_names))[:16]


def code_inputs(*module_names: str) -> dict:
    """The code part of a step's key inputs: the version and the modules it covers."""
    closure = code_closure(*module_names)
    return {"version": stable_hash(closure)[:16], "modules": sorted(closure)}
