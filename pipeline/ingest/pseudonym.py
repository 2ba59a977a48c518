"""Keyed pseudonyms of PatientID for every output (``ingest.pseudonymise_patient_ids``).

A pseudonym is ``PSN-`` + the first 16 hex digits of HMAC-SHA256(key, PatientID): stable across
nightly runs (the same patient keeps the same folder and row), not reversible without the key,
and not guessable from a list of hospital IDs without the key (a plain hash would be).

Where things live in a pseudonymised run (the output folder holds no raw identifier):
- the 64-byte key: ``ingest.pseudonym_key_file``, by default
  ``$XDG_CONFIG_HOME/ablation-response/pseudonym.key`` (``~/.config/...``), mode 0600, generated
  once with :mod:`secrets`. It must lie neither in the output folder nor in the folder of the
  mapping: whoever holds the map alone cannot extend it, whoever holds the outputs cannot
  re-identify. Losing the key means new pseudonyms on the next run.
- the catalogue (raw PatientIDs, paths, table ``pseudonyms``) and the mapping
  ``catalogue.pseudonyms.csv`` (mode 0600), for the team that may re-identify: the private
  folder ``ingest.private_dir``, by default ``<output folder>.private`` beside the output folder.

Free text is redacted too (:class:`Redactor`): every path below the export root in errors.csv,
assessment.json and reasons becomes ``export:<16 hex>`` (HMAC of the relative path: the private
side finds the file again with :meth:`Redactor.reference` over the catalogue's paths), a file or
folder name of the export met on its own becomes ``~<8 hex>``, a raw PatientID its pseudonym.
Only identifiers are replaced: the catalogue never stores names or birth dates, which reach
text only through folder and file names (see docs/ingest.md "Privacy").
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import replace
from pathlib import Path

from pipeline.core.files import atomic_write_bytes, atomic_write_text, csv_text
from pipeline.core.records import ErrorRecord, StudyRecord
from pipeline.ingest.catalogue import Catalogue, recorded_export_dir

PREFIX = "PSN-"
_KEY_BYTES = 64


def key_path(catalogue_path: Path) -> Path:
    """Where keys were kept before issue 16 (beside the catalogue): moved away on the next run."""
    return Path(catalogue_path).with_suffix(".key")


def default_key_file() -> Path:
    """``$XDG_CONFIG_HOME/ablation-response/pseudonym.key`` (XDG base directories: a per-user
    place that no export or output folder shares)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ablation-response" / "pseudonym.key"


def mapping_csv_path(catalogue_path: Path) -> Path:
    p = Path(catalogue_path)
    return p.with_name(f"{p.stem}.pseudonyms.csv")


def check_key_place(key_file: Path, out_dir: Path | None, catalogue_path: Path) -> None:
    """Refuse a key inside the output folder or in the folder of the mapping (ValueError)."""
    key_dir = Path(key_file).resolve().parent
    if out_dir is not None and key_dir.is_relative_to(Path(out_dir).resolve()):
        raise ValueError(f"pseudonymisation key {key_file} lies inside the output folder {out_dir}: "
                         "set ingest.pseudonym_key_file to a private place")
    if key_dir == Path(catalogue_path).resolve().parent:
        raise ValueError(f"pseudonymisation key {key_file} lies beside the pseudonym mapping "
                         f"({mapping_csv_path(catalogue_path)}): keep them apart")


def load_or_create_key(path: Path) -> bytes:
    """The secret key at ``path`` (hex text), generated on first use with mode 0600."""
    path = Path(path)
    if path.exists():
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"pseudonymisation key {path} is not hex text: restore it or remove it "
                             "(a new key gives every patient a new pseudonym)") from None
        if len(key) < 32:
            raise ValueError(f"pseudonymisation key {path} is too short ({len(key)} bytes, >= 32 needed)")
        return key
    key = secrets.token_bytes(_KEY_BYTES)
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    atomic_write_bytes(path, key.hex().encode() + b"\n", mode=0o600)
    os.chmod(path, 0o600)
    return key


def pseudonym(key: bytes, patient_id: str) -> str:
    """``PSN-`` + 16 hex digits of HMAC-SHA256(key, PatientID) (64 bits: no collision in any
    realistic cohort)."""
    digest = hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:16].upper()


class Pseudonymiser:
    """Maps PatientIDs to pseudonyms with the key in ``key_file``; remembers the pairs it made
    so that :meth:`save` can store the mapping beside the catalogue."""

    def __init__(self, catalogue_path: Path, key_file: Path | None = None) -> None:
        self.catalogue_path = Path(catalogue_path)
        self.key_file = Path(key_file) if key_file is not None else default_key_file()
        check_key_place(self.key_file, None, self.catalogue_path)
        self.key = load_or_create_key(self.key_file)
        self.mapping: dict[str, str] = {}

    def __repr__(self) -> str:  # never the mapping (a repr may reach a log)
        return f"Pseudonymiser({len(self.mapping)} patients)"

    def __call__(self, patient_id: str) -> str:
        if not patient_id:
            return patient_id
        if patient_id not in self.mapping:
            self.mapping[patient_id] = pseudonym(self.key, patient_id)
        return self.mapping[patient_id]

    def studies(self, studies: list[StudyRecord]) -> list[StudyRecord]:
        """The studies (and their series) with pseudonymised patient IDs (copies)."""
        out = []
        for st in studies:
            pid = self(st.patient_id)
            out.append(replace(st, patient_id=pid, series=[replace(s, patient_id=pid) for s in st.series]))
        return out

    def errors(self, errors: list[ErrorRecord]) -> list[ErrorRecord]:
        return [replace(e, patient_id=self(e.patient_id)) for e in errors]

    def save(self) -> None:
        """Store the mapping in the catalogue and in the CSV beside it (merged with earlier runs)."""
        with Catalogue(self.catalogue_path, recorded_export_dir(self.catalogue_path)) as cat:
            cat.save_pseudonyms(self.mapping)
            everything = cat.pseudonyms()
        rows = [{"patient_id": pid, "pseudonym": psn} for pid, psn in sorted(everything.items())]
        atomic_write_text(mapping_csv_path(self.catalogue_path), csv_text(["patient_id", "pseudonym"], rows), mode=0o600)
        os.chmod(mapping_csv_path(self.catalogue_path), 0o600)


def _digest(key: bytes, kind: str, text: str) -> str:
    return hmac.new(key, f"{kind}\0{text}".encode(), hashlib.sha256).hexdigest()


def path_reference(key: bytes, relative_path: str) -> str:
    """``export:`` + 16 hex digits of HMAC(key, path relative to the export root, POSIX): the
    stand-in for a path in a pseudonymised run's outputs (stable across runs; the private side
    maps it back by computing it over the catalogue's paths)."""
    return "export:" + _digest(key, "path", relative_path.strip("/"))[:16]


# Characters that end a path or a name inside a reason ("... IM0001.dcm: ...", "'name'").
_DELIMITERS = frozenset(" \t\n'\",;:()[]{}<>|/")
_MIN_NAME = 3  # shorter folder/file names cannot carry a name or a date
_STANDARD_NAMES = {"DICOMDIR"}  # named by the standard (PS3.10), and a word of the reasons
_DATA_KEYS = {"patient_id", "cache_keys", "timepoint", "category", "role", "pipeline_version"}
# A folder named by a UID (a common export layout) names no person, and UIDs are kept in the
# outputs: replacing it would rewrite the study's own identifiers.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


class Redactor:
    """Removes raw identifiers from the text of a pseudonymised run (see the module docstring).

    ``root``: the export directory (absolute); ``paths``: every relative path catalogued;
    ``patient_ids``: every raw PatientID met; ``pseudonymise``: PatientID -> pseudonym.
    """

    def __init__(self, key: bytes, root: Path, paths: list[str], patient_ids: set[str], pseudonymise) -> None:
        self._key = key
        self._root = str(Path(root))
        self._known = set(paths)
        for rel in paths:  # and every folder above a file
            parts = rel.split("/")
            self._known.update("/".join(parts[:i]) for i in range(1, len(parts)))
        names = {part for rel in paths for part in rel.split("/")
                 if len(part) >= _MIN_NAME and part.upper() not in _STANDARD_NAMES and not _UID.match(part)}
        self._replacement = {name: "~" + self._digest("name", name)[:8] for name in names}
        self._replacement.update({pid: pseudonymise(pid) for pid in patient_ids if pid})
        # Longest first, so that a name containing another is replaced whole.
        self._targets = sorted(self._replacement, key=len, reverse=True)
        self._tokens = {t for target in self._targets for t in re.findall(r"[A-Za-z0-9]+", target)}

    def __repr__(self) -> str:  # never the identifiers it holds
        return f"Redactor({len(self._targets)} identifiers)"

    def _digest(self, kind: str, text: str) -> str:
        return _digest(self._key, kind, text)

    def reference(self, relative_path: str) -> str:
        return path_reference(self._key, relative_path)

    def path(self, path: str) -> str:
        """A path below the export root as its reference; any other path (outputs) unchanged."""
        if not path:
            return path
        if path == self._root or path.startswith(self._root + "/"):
            return self.reference(path[len(self._root) + 1:])
        return self.text(path)

    def text(self, text: str) -> str:
        if not text:
            return text
        text = self._absolute_paths(text)
        if not self._tokens.intersection(re.findall(r"[A-Za-z0-9]+", text)):
            return text
        for target in self._targets:
            if target in text:
                text = re.sub(rf"(?<![\w.\-^]){re.escape(target)}(?![\w.\-^])",
                              lambda _m, t=target: self._replacement[t], text)
        return text

    def _absolute_paths(self, text: str) -> str:
        """Each ``<root>/<known path>`` (the longest known one) as its reference."""
        prefix = self._root + "/"
        out, i = [], 0
        while (j := text.find(prefix, i)) >= 0:
            start = j + len(prefix)
            end = start
            for k in range(start, len(text) + 1):
                if (k == len(text) or text[k] in _DELIMITERS) and text[start:k] in self._known:
                    end = k
            out.append(text[i:j])
            out.append(self.reference(text[start:end]) if end > start else "export:")
            i = end if end > start else start
        out.append(text[i:])
        return "".join(out)

    def error(self, error: ErrorRecord) -> ErrorRecord:
        return replace(error, path=self.path(error.path), reason=self.text(error.reason))

    def tree(self, value):
        """Every string of a JSON-like tree redacted (dicts, lists; keys kept), but the values
        that are data, not text: identifiers (``*_uid``, ``patient_id``: already pseudonymous),
        dates (``*_date``: an export folder may be named by one), codes and cache keys."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: v if k.endswith(("_uid", "_date")) or k in _DATA_KEYS else self.tree(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [self.tree(v) for v in value]
        return value


def redactor_for(mapper: Pseudonymiser, export_dir: Path) -> Redactor:
    """The :class:`Redactor` of a run, from the catalogue's paths and PatientIDs."""
    with Catalogue(mapper.catalogue_path, recorded_export_dir(mapper.catalogue_path)) as cat:
        rows = cat.paths_and_patients()
    return Redactor(mapper.key, Path(export_dir).resolve(), [p for p, _ in rows],
                    {pid for _, pid in rows if pid}, mapper)


def pseudonymise_run(index, sessions: dict | None, catalogue_path: Path, key_file: Path | None = None,
                     export_dir: Path | None = None):
    """(index, sessions, redactor) of a run with every PatientID replaced by its pseudonym.

    ``index`` is an :class:`pipeline.ingest.index.IndexResult` (a pseudonymised copy is returned, its
    errors redacted); ``sessions`` the procedures file's ``{PatientID: [Procedure]}``
    (re-keyed, or None); ``key_file`` the key (default :func:`default_key_file`);
    ``export_dir`` the export root (default: the catalogue's). The mapping is stored beside
    the catalogue before anything is written to the outputs. The redactor cleans the text
    that the later stages produce.
    """
    mapper = Pseudonymiser(catalogue_path, key_file)
    # Raw IDs met in reasons are pseudonymised (and remembered in the mapping) too.
    redactor = redactor_for(mapper, Path(export_dir) if export_dir else recorded_export_dir(mapper.catalogue_path))
    index = replace(index, studies=mapper.studies(index.studies),
                    errors=[redactor.error(e) for e in mapper.errors(index.errors)])
    if sessions is not None:
        sessions = {mapper(pid): [replace(p, patient_id=mapper(pid)) for p in procs] for pid, procs in sessions.items()}
    mapper.save()
    return index, sessions, redactor
