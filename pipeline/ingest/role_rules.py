"""The series role rules: loading and validating the YAML file of keywords and confidences.

Owns :func:`load_role_rules` (``configs/series_roles.yaml`` or a site's file, ``extends: default``
merging, cached by path, size and modification time), :class:`RoleRules` and
:class:`RoleRulesError`. The rules are applied by :mod:`pipeline.ingest.series_roles`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.core.config import CONFIG_DIR

DEFAULT_ROLE_RULES = CONFIG_DIR / "series_roles.yaml"
_KEYWORD_KINDS = ("post_contrast", "pre_contrast", "subtraction", "t2", "t1", "localizer", "diffusion",
                  "adc", "ignore")
_CONFIDENCE_KINDS = ("tag", "whole_word", "prefix", "sequence_only", "conflict")


class RoleRulesError(ValueError):
    """The role rules file is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class RoleRules:
    """The role rules of one YAML file (after ``extends: default`` merging)."""

    t2_min_echo_time_ms: float
    keywords: dict[str, list[str]]
    vendors: dict[str, dict[str, list[str]]]
    confidence: dict[str, float]
    ambiguous_below: float
    source: str = ""

    def keywords_for(self, manufacturer: str) -> dict[str, list[str]]:
        """Keywords with the additions of every vendor key that prefixes ``manufacturer``."""
        out = {k: list(v) for k, v in self.keywords.items()}
        m = (manufacturer or "").strip().lower()
        for vendor, extra in self.vendors.items():
            if m and m.startswith(vendor.lower()):
                for kind, words in extra.items():
                    out[kind] = out.get(kind, []) + [w for w in words if w not in out.get(kind, [])]
        return out


def _merge_rules(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_rules(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + [v for v in value if v not in out[key]]
        else:
            out[key] = value
    return out


def _validate_rules(raw: dict, source: str) -> RoleRules:
    def fail(why: str) -> RoleRulesError:
        return RoleRulesError(f"series role rules {source}: {why}")

    known = {"version", "extends", "t2_min_echo_time_ms", "keywords", "vendors", "confidence", "ambiguous_below"}
    if unknown := sorted(set(raw) - known):
        raise fail(f"unknown key(s) {unknown}")
    kw = raw.get("keywords") or {}
    if unknown := sorted(set(kw) - set(_KEYWORD_KINDS)):
        raise fail(f"unknown keyword kind(s) {unknown}; allowed {list(_KEYWORD_KINDS)}")
    vendors = raw.get("vendors") or {}
    for vendor, extra in vendors.items():
        if not isinstance(extra, dict) or (bad := sorted(set(extra) - set(_KEYWORD_KINDS))):
            raise fail(f"vendors.{vendor}: unknown keyword kind(s) {bad if isinstance(extra, dict) else extra}")
    conf = raw.get("confidence") or {}
    if missing := [k for k in _CONFIDENCE_KINDS if not isinstance(conf.get(k), (int, float))]:
        raise fail(f"confidence.{missing[0]} missing or not a number")
    try:
        return RoleRules(
            t2_min_echo_time_ms=float(raw["t2_min_echo_time_ms"]),
            keywords={k: [str(w).lower() for w in (kw.get(k) or [])] for k in _KEYWORD_KINDS},
            vendors={v: {k: [str(w).lower() for w in ws or []] for k, ws in e.items()} for v, e in vendors.items()},
            confidence={k: float(conf[k]) for k in _CONFIDENCE_KINDS},
            ambiguous_below=float(raw["ambiguous_below"]),
            source=source,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(f"missing or malformed {exc}") from None


_RULES_CACHE: dict[tuple[str, int, int], RoleRules] = {}


def _read_rules_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise RoleRulesError(f"series role rules {path}: cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise RoleRulesError(f"series role rules {path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RoleRulesError(f"series role rules {path}: not a mapping")
    return raw


def resolve_rules_path(name: str | os.PathLike | None) -> Path:
    """A rules path as configured: absolute, relative to the working directory, or a bare name
    of a file in the package's ``configs/`` folder (the shipped default)."""
    if not name:
        return DEFAULT_ROLE_RULES
    path = Path(name)
    if not path.is_absolute() and not path.exists() and (DEFAULT_ROLE_RULES.parent / path).exists():
        return DEFAULT_ROLE_RULES.parent / path
    return path


def load_role_rules(name: str | os.PathLike | None = None) -> RoleRules:
    """Read and validate a role rules file (cached by path, size and modification time).

    A file with ``extends: default`` is merged over ``configs/series_roles.yaml``: lists are
    appended, scalars replaced. Raises :class:`RoleRulesError` with the file and field.
    """
    path = resolve_rules_path(name).resolve()
    try:
        st = path.stat()
    except OSError as exc:
        raise RoleRulesError(f"series role rules {path}: cannot be read: {exc.strerror or exc}") from None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _RULES_CACHE:
        raw = _read_rules_yaml(path)
        extends = raw.get("extends")
        if extends not in (None, "default"):
            raise RoleRulesError(f"series role rules {path}: extends must be 'default' (got {extends!r})")
        if extends == "default" and path != DEFAULT_ROLE_RULES.resolve():
            raw = _merge_rules(_read_rules_yaml(DEFAULT_ROLE_RULES), {k: v for k, v in raw.items() if k != "extends"})
        _RULES_CACHE[key] = _validate_rules(raw, str(path))
    return _RULES_CACHE[key]
