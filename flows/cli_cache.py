"""`loraflow cache ls` and `loraflow cache clear [--step STEP] [--dry-run]`.

What loraflow keeps under LORAFLOW_HOME, per step: downloads/<key>/, datasets/<key>/,
runs/<key>/ — each with the manifest that lists its files and the inputs that keyed
it — plus Prefect's result records (results/), the raw Hub dataset cache
(datasets-cache/) and preflight's config cache (hub/).

Module-level imports stay light: every `loraflow` command builds this parser.
"""
from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from tasks import settings

STEPS = ("download", "dataset", "train")
OTHER_DIRS = {"datasets-cache": "raw Hub dataset files (datasets' own cache)",
              "hub": "preflight's config.json cache"}


def register(subparsers) -> None:
    """Add `cache ls` and `cache clear` to the loraflow command."""
    cache = subparsers.add_parser("cache", help="list or clear what loraflow has cached",
                                  description="What is cached under LORAFLOW_HOME, its size "
                                  "and the inputs that keyed it; clear it by step.")
    sub = cache.add_subparsers(dest="cache_command", required=True)
    ls = sub.add_parser("ls", help="list cached steps: key, size, state, inputs")
    ls.add_argument("--step", choices=STEPS + ("all",), default="all")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    clear = sub.add_parser("clear", help="remove cached steps (in-use entries are kept)")
    clear.add_argument("--step", choices=STEPS + ("all",), default="all",
                       help="only this step's entries (default: everything)")
    clear.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    clear.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(handler=cmd_ls)
    clear.set_defaults(handler=cmd_clear)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _local_results_dir() -> Path | None:
    storage = settings.result_storage()
    return storage if isinstance(storage, Path) else None


def _summary(step: str, inputs: dict | None) -> str:
    """One line naming the inputs that keyed an entry."""
    if not inputs:
        return "(inputs not recorded)"
    code = f"code {inputs.get('code', {}).get('version', '?')}"
    if step == "download":
        return (f"{inputs['repo_id']}@{inputs['commit'][:12]} · "
                f"{len(inputs.get('patterns', []))} file patterns · {code}")
    if step == "dataset":
        from tasks.cache.keys import stable_hash

        rows = inputs["rows"]
        src = (f"{rows['hub']}@{(rows.get('commit') or '')[:12]}" if "hub" in rows
               else f"{rows.get('kind', '')} file sha256 {rows['file_sha256'][:12]}")
        data = inputs.get("data", {})
        return (f"{src} · format {data.get('format')} · max_length {data.get('max_length')} · "
                f"tokenizer {stable_hash(inputs.get('tokenizer'))[:12]} · "
                f"seed {inputs.get('seed')} · {code}")
    base, lora, t = inputs["base"], inputs.get("lora", {}), inputs.get("training", {})
    return (f"base {base['repo_id']}@{base['commit'][:12]} · dataset {inputs['dataset'][:20]} · "
            f"lora r={lora.get('r')} alpha={lora.get('alpha')} · lr {t.get('learning_rate')} · "
            f"max_steps {t.get('max_steps')} · seed {t.get('seed')} · {code}")


def _inputs_file(path: Path) -> dict | None:
    try:
        return json.loads((path / "inputs.json").read_text())
    except (OSError, ValueError):
        return None


def cache_entries(steps=STEPS) -> list[dict]:
    """Every cached (or partly computed) step output under LORAFLOW_HOME."""
    from tasks.cache.keys import STEP_DIRS
    from tasks.cache.locks import OrphanBreakingLockManager
    from tasks.cache.manifest import changed_files, dir_size, read_manifest
    from tasks.cache.policy import lock_dir

    home = settings.loraflow_home()
    locks = OrphanBreakingLockManager(lock_dir())
    results = _local_results_dir()
    entries = []
    for step in steps:
        parent = home / STEP_DIRS[step]
        if not parent.is_dir():
            continue
        for path in sorted(p for p in parent.iterdir() if p.is_dir()):
            key = path.name.split(".partial-")[0]
            manifest = read_manifest(path)
            entry = {"step": step, "key": key, "path": str(path), "size_bytes": dir_size(path),
                     "state": "partial", "created": None, "inputs": None, "changed": [],
                     "record": None if results is None else (results / key).is_file()}
            holder = locks.holder_info(key) if locks.is_locked(key) else None
            if holder:  # being computed now: report, don't inspect half-written files
                entry["state"] = "in use"
                entry["holder"] = {k: holder.get(k) for k in ("host", "pid", "acquired")}
            elif manifest is not None and ".partial-" not in path.name:
                changed = changed_files(path, manifest) or []
                entry["state"] = "damaged" if changed else "complete"
                entry["changed"] = changed
            entry["inputs"] = (manifest or {}).get("inputs") or _inputs_file(path)
            if manifest is not None:
                entry["created"] = datetime.fromtimestamp(
                    (path / "manifest.json").stat().st_mtime, timezone.utc).isoformat(
                    timespec="seconds")
            if step == "train" and entry["state"] in ("partial", "damaged"):
                from tasks.training.checkpoints import last_checkpoint

                last = last_checkpoint(path, prune=False)
                entry["resumable_from_step"] = int(last.rsplit("-", 1)[1]) if last else None
            entry["summary"] = _summary(step, entry["inputs"])
            entries.append(entry)
    return entries


def _others() -> list[dict]:
    from tasks.cache.manifest import dir_size

    home = settings.loraflow_home()
    out = []
    results = _local_results_dir()
    if results is not None and results.is_dir():
        records = [p for p in results.iterdir() if p.is_file()]
        out.append({"name": "results", "path": str(results), "count": len(records),
                    "size_bytes": sum(p.stat().st_size for p in records),
                    "what": "Prefect result records of cached steps"})
    for name, what in OTHER_DIRS.items():
        if (home / name).is_dir():
            out.append({"name": name, "path": str(home / name),
                        "size_bytes": dir_size(home / name), "what": what})
    return out


def cmd_ls(args) -> int:
    steps = STEPS if args.step == "all" else (args.step,)
    entries, others = cache_entries(steps), (_others() if args.step == "all" else [])
    total = sum(e["size_bytes"] for e in entries) + sum(o["size_bytes"] for o in others)
    if args.json:
        print(json.dumps({"home": str(settings.loraflow_home()), "entries": entries,
                          "other": others, "total_bytes": total}))
        return 0
    if not entries and not others:
        print(f"nothing cached under {settings.loraflow_home()}")
        return 0
    print(f"LORAFLOW_HOME {settings.loraflow_home()}")
    print(f"{'STEP':<9} {'KEY':<22} {'SIZE':>10}  {'STATE':<9} CREATED")
    for e in entries:
        state = e["state"]
        if e.get("resumable_from_step"):
            state += f" (checkpoint at step {e['resumable_from_step']})"
        if e["changed"]:
            state += f" ({len(e['changed'])} files changed)"
        print(f"{e['step']:<9} {e['key'][:22]:<22} {human_size(e['size_bytes']):>10}  "
              f"{state:<9} {e['created'] or '-'}")
        print(f"{'':<9} ↳ {e['summary']}")
    for o in others:
        count = f", {o['count']} records" if "count" in o else ""
        print(f"{o['name']:<32} {human_size(o['size_bytes']):>10}  {o['what']}{count}")
    print(f"total {human_size(total)}")
    return 0


def cmd_clear(args) -> int:
    steps = STEPS if args.step == "all" else (args.step,)
    entries = cache_entries(steps)
    results = _local_results_dir()
    removed, kept = [], []
    for e in entries:
        if e["state"] == "in use":
            kept.append(e)
            continue
        removed.append(e)
        if not args.dry_run:
            shutil.rmtree(e["path"], ignore_errors=True)
            if results is not None:
                (results / e["key"]).unlink(missing_ok=True)
    others = []
    if args.step == "all":
        for o in _others():
            others.append(o)
            if not args.dry_run:
                if o["name"] == "results":
                    for p in Path(o["path"]).iterdir():
                        # Records of the steps above went with them; what remains (e.g.
                        # verify's) is keyed on Hub commits: safe to drop with the rest.
                        if p.is_file():
                            p.unlink(missing_ok=True)
                else:
                    shutil.rmtree(o["path"], ignore_errors=True)
    freed = sum(e["size_bytes"] for e in removed) + sum(o["size_bytes"] for o in others)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "removed": removed, "kept_in_use": kept,
                          "other": others, "freed_bytes": freed}))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for e in removed:
        print(f"{verb} {e['step']:<8} {e['key'][:22]}  {human_size(e['size_bytes']):>10}  "
              f"{e['summary']}")
    for o in others:
        print(f"{verb} {o['name']:<31}  {human_size(o['size_bytes']):>10}  {o['what']}")
    for e in kept:
        h = e.get("holder") or {}
        print(f"kept {e['step']} {e['key'][:22]}: in use by pid {h.get('pid')} on "
              f"{h.get('host')}", file=sys.stderr)
    print(f"{verb} {len(removed)} cached step outputs, {human_size(freed)}"
          + ("" if results is not None or not removed else
             " (records in the result-storage block stay; without their files they are "
             "misses)"))
    return 0
