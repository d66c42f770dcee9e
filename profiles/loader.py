"""Load a profile from YAML (or a preset name) with `section.key=value` overrides.

Every failure becomes a ProfileError whose message names the field, the cause and
the fix, so `loraflow validate` and `loraflow run` can exit non-zero with it.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from profiles.errors import ProfileError
from profiles.schema import Profile, presets_dir


def resolve_profile_path(name_or_path: str) -> Path:
    """A file path as given, or the name of a preset in profiles/ (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = presets_dir() / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if preset.is_file():
        return preset
    names = ", ".join(sorted(p.stem for p in presets_dir().glob("*.yaml")))
    raise ProfileError(f"profile '{name_or_path}': no such file or preset. Fix: give a path "
                       f"to a YAML profile or one of the presets: {names}.")


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (1e-3, true, [a])."""
    if "=" not in assignment:
        raise ProfileError(f"--set '{assignment}': expected section.key=value. "
                           "Fix: e.g. --set lora.r=4")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ProfileError(f"--set '{assignment}': '{dotted}' is not section.key. "
                           "Fix: e.g. --set training.learning_rate=1e-4")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ProfileError(f"--set '{assignment}': '{key}' is a value, not a section "
                               "with fields. Fix: name a field of a section, e.g. --set "
                               "lora.r=4 (`loraflow validate PROFILE` prints them).")
    node[keys[-1]] = _parse_value(assignment, raw)


def _parse_value(assignment: str, raw: str):
    """The YAML value of one `--set` pair, or a ProfileError naming the pair."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        where = f" at column {mark.column + 1}" if mark is not None else ""
        raise ProfileError(
            f"--set '{assignment}': the value {raw!r} is not valid YAML ({problem}{where}). "
            f"Fix: quote it to pass it as text, e.g. --set \"{assignment.split('=', 1)[0]}="
            f"'{raw}'\", or correct the YAML (lists as [a, b], maps as {{k: v}}).") from None


def describe_validation_error(err: ValidationError, section: str | None = None,
                              heading: str = "invalid profile") -> str:
    """One line per bad field: the dotted field, what is wrong, and what it should be.

    Args:
        err: pydantic's error for a Profile, or for one section validated alone.
        section: the section's name when `err` is for a section alone (e.g. "publish"
            for a PublishSection), so each line still names the full field.
        heading: what the message starts with (e.g. "overrides: invalid value").
    Returns:
        "<heading>: <field>: …" on one line for one bad field; for several, the heading
        and one indented line per field.
    """
    lines = []
    for e in err.errors():
        path = ((section,) if section else ()) + tuple(e["loc"])
        loc = ".".join(str(p) for p in path)
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown field. Fix: remove it or check its spelling "
                         "(`loraflow validate` prints every known field).")
            continue
        if e["type"] == "value_error":
            message = str(e["ctx"]["error"])
            # A field's own validator (e.g. the repo-id type) does not know its field's
            # name; a model validator's message starts with the fields it names.
            lines.append(message if not loc or message.startswith((f"{loc}:", f"{loc}."))
                         else f"{loc}: {message}")
            continue
        hint = _field_description(path)
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {e['msg']}{shown}. Fix: set {loc} to a valid value"
                     + (f" — {hint}" if hint else "."))
    return join_field_errors(heading, lines)


def join_field_errors(heading: str, lines: list[str]) -> str:
    """`heading: line` when one field is wrong (the one line the README promises), else
    the heading and one indented line per field, so several errors stay readable."""
    if len(lines) == 1:
        return f"{heading}: {lines[0]}"
    return f"{heading} ({len(lines)} fields):\n  " + "\n  ".join(lines)


def _field_description(loc: tuple) -> str | None:
    model = Profile
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            model = ann
        else:
            return field.description
    return None


def load_profile(name_or_path: str, overrides: list[str] | None = None) -> Profile:
    """Read, override and validate a profile. Raises ProfileError."""
    path = resolve_profile_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ProfileError(f"profile {path}: not valid YAML ({problem}{where}). Fix the "
                           "syntax there (indentation, a missing ':' or closing bracket); "
                           "`loraflow validate` checks it without running.") from None
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path}: expected a mapping of sections "
                           "(model, quantization, lora, data, training, publish), got a "
                           f"{type(data).__name__}. Fix: write each section as a key at the "
                           "top level, e.g. `lora:` then its fields indented below it.")
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        profile = Profile.model_validate(data)
    except ValidationError as err:
        raise ProfileError(describe_validation_error(err)) from None
    booleans = _booleans_taken_as_numbers(data, profile)
    if booleans:
        raise ProfileError(join_field_errors("invalid profile", [
            f"{loc}: {str(value).lower()} is a boolean where a number is expected (YAML reads "
            f"true/false/yes/no/on/off as booleans). Fix: set {loc} to a number"
            + (f" — {hint}" if (hint := _field_description(tuple(loc.split(".")))) else ".")
            for loc, value in booleans]))
    return profile


def _booleans_taken_as_numbers(data: dict, model, prefix: str = "") -> list[tuple[str, bool]]:
    """The fields given a YAML boolean that validated into a number.

    pydantic's lax mode turns True into 1 for int and float fields (`lora.r: true` would
    train with r=1). The schema stays lax on purpose elsewhere (e.g. "1e-4" for a float),
    so instead of strict mode the input is compared with what it became: a bool in,
    a non-bool number out, is refused.
    """
    found = []
    for key, value in data.items():
        attr = getattr(model, key, None) if isinstance(key, str) else None
        loc = f"{prefix}{key}"
        if isinstance(value, bool) and isinstance(attr, (int, float)) \
                and not isinstance(attr, bool):
            found.append((loc, value))
        elif isinstance(value, dict) and isinstance(attr, BaseModel):
            found += _booleans_taken_as_numbers(value, attr, f"{loc}.")
    return found


def profile_name(name_or_path: str) -> str:
    return resolve_profile_path(name_or_path).stem
