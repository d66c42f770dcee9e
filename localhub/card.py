"""README.md YAML front matter: parsed into `cardData` and checked by /api/validate-yaml."""

from __future__ import annotations

import re

import yaml

# Same shape the Hub accepts: the file starts with '---', metadata, then a line of '---'.
_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


class CardError(ValueError):
    """The front matter is not valid YAML, or not a mapping."""


def front_matter(text: str) -> dict | None:
    """The metadata mapping of a README, or None when it has no front matter.

    Raises CardError when there is front matter that does not parse to a mapping.
    """
    m = _FRONT_MATTER.match(text)
    if m is None:
        return None
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        raise CardError(f"Invalid YAML in README.md front matter: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CardError("README.md front matter must be a YAML mapping")
    return data


def card_data(readme: bytes | None) -> dict | None:
    """`cardData` for repo info: the front matter, or None when absent or invalid."""
    if readme is None:
        return None
    try:
        return front_matter(readme.decode("utf-8", errors="replace"))
    except CardError:
        return None


def validate(content: str) -> tuple[list[dict], list[dict]]:
    """(errors, warnings) in the Hub's shape, `[{"message": ...}]`, for /api/validate-yaml."""
    try:
        data = front_matter(content)
    except CardError as e:
        return [{"message": str(e)}], []
    if data is None or data == {}:
        return [], [{"message": "Empty or missing yaml metadata in repo card"}]
    return [], []
