"""Visual Genome "captions": the phrase list Xmodal-Ctx and HAAV encode into their caption DB.

Reproduces ``VisualGenomeCaptions.parse_annotations`` (``ctx/dataset.py``, identical in XC and HV)
from ``attributes.json`` and ``relationships.json``:

- word normalizer: lowercase, strip, delete ASCII 0-31; synset normalizer: the same, then the text
  before the first ``.`` (``man.n.01`` -> ``man``; ``hot_dog.n.01`` -> ``hot_dog``).
- attributes: per object annotation, the set of normalized synset heads (``names`` unused) and the set
  of normalized attributes (a missing key counts as empty); each head's attributes are unioned into
  a global head -> set map; phrase ``"{attr} {head}"`` per non-empty attribute.
- relations: predicate (word normalizer), subject/object synset heads; every (subject, object) head
  pair gives ``"{subj} {pred} {obj}"`` (an empty predicate leaves a double space).
- the final list is ``np.unique`` of both lists: deduplicated and sorted by code point, which is
  Python's ``sorted(set(...))`` for these strings (no NUL characters survive the normalizers). The
  position in this list is the caption's row id in the caption DB and the faiss index.

**Attribute leak (upstream quirk, reproduced by default).** Upstream stores the annotation's own
attribute set object for a head seen for the first time, so all heads first seen together in one
multi-synset annotation share a single set; a later annotation that unions attributes into one of
them (in place) adds them to all. Example: annotation 1 ``synsets [a.n.01, b.n.01], attrs [red]``,
annotation 2 ``synsets [a.n.01], attrs [big]`` gives ``big a, big b, red a, red b`` with the leak
and ``big a, red a, red b`` without (``attribute_leak=False``, the corrected list).

The JSON files (GBs) are streamed with ijson, one image entry at a time: memory holds the phrase set,
not the file. Malformed input raises one :class:`~vlprep.VlprepError` naming the file, the image
entry (index in the top-level list) and the field. (Upstream would crash on such input too, or for a
bare string in place of a list iterate its characters; we refuse it.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from vlprep import VlprepError, storage

log = logging.getLogger(__name__)

_CONTROL = str.maketrans("", "", "".join(chr(c) for c in range(32)))


def normalize_word(s: str) -> str:
    """Lowercase, strip, delete ASCII 0-31 (in that order, as upstream)."""
    return s.lower().strip().translate(_CONTROL)


def normalize_synset(s: str) -> str:
    """The word normalizer, then the text before the first ``.``."""
    return normalize_word(s).split(".")[0]


class PhraseBuilder:
    """Accumulates attribute and relation phrases; :meth:`phrases` gives the final sorted list."""

    def __init__(self, attribute_leak: bool = True):
        self.attribute_leak = attribute_leak
        self._group_of: dict[str, int] = {}  # head -> index of its attribute set
        self._groups: list[set[str]] = []  # attribute sets; with the leak, shared by heads first seen together
        self._relations: set[str] = set()
        self.n_attribute_annotations = 0
        self.n_relationships = 0

    def add_attributes(self, synsets: Iterable[str], attributes: Iterable[str]) -> None:
        """One object annotation of attributes.json."""
        self.n_attribute_annotations += 1
        heads = {normalize_synset(s) for s in synsets}
        attrs = {normalize_word(a) for a in attributes}
        new = []
        for head in heads:
            gid = self._group_of.get(head)
            if gid is None:
                new.append(head)
            else:
                self._groups[gid] |= attrs
        if not new:
            return
        if self.attribute_leak:  # upstream: every new head gets the same set object
            self._groups.append(set(attrs))
            for head in new:
                self._group_of[head] = len(self._groups) - 1
        else:
            for head in new:
                self._groups.append(set(attrs))
                self._group_of[head] = len(self._groups) - 1

    def add_relationship(self, predicate: str, subject_synsets: Iterable[str], object_synsets: Iterable[str]) -> None:
        """One relationship of relationships.json."""
        self.n_relationships += 1
        pred = normalize_word(predicate)
        subjects = {normalize_synset(s) for s in subject_synsets}
        objects = {normalize_synset(s) for s in object_synsets}
        for s in subjects:
            for o in objects:
                self._relations.add(f"{s} {pred} {o}")

    def phrases(self) -> list[str]:
        """Attribute and relation phrases, deduplicated and sorted (``np.unique`` order)."""
        out = set(self._relations)
        for head, gid in self._group_of.items():
            out.update(f"{a} {head}" for a in self._groups[gid] if a != "")
        return sorted(out)


# ---------------------------------------------------------------- streaming the JSON files


class _CountingReader:
    """A binary reader that counts the bytes handed out (to say where a parse error is)."""

    def __init__(self, raw: BinaryIO, head: bytes = b""):
        self._raw, self._head, self.offset = raw, head, 0

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data, self._head = (self._head, b"") if n < 0 or n >= len(self._head) else (self._head[:n], self._head[n:])
        else:
            data = self._raw.read(n)
        self.offset += len(data)
        return data


def _name_of(source: str | Path | BinaryIO) -> str:
    return str(source) if isinstance(source, (str, Path)) else str(getattr(source, "name", "<stream>"))


@contextlib.contextmanager
def _open(source: str | Path | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(source, (str, Path)):
        try:
            with storage.open_read(str(source)) as f:
                yield f
        except FileNotFoundError:
            raise VlprepError(f"{source}: no such file; pass Visual Genome's attributes.json / relationships.json") from None
    else:
        yield source


def iter_images(source: str | Path | BinaryIO, name: str | None = None) -> Iterator[tuple[int, Any]]:
    """Stream the top-level JSON list of a VG file: (index, entry) one at a time."""
    import ijson

    name = name or _name_of(source)
    with _open(source) as raw:
        head = b""
        while True:
            chunk = raw.read(1)
            head += chunk
            if not chunk or not chunk.isspace():
                break
        if head.strip()[:1] != b"[":
            raise VlprepError(f"{name}: expected a JSON list of image entries at the top level (file starts {head[-1:]!r})")
        reader = _CountingReader(raw, head)
        index = -1
        try:
            for index, entry in enumerate(ijson.items(reader, "item", use_float=True)):
                yield index, entry
        except ijson.JSONError as e:
            text = " ".join(str(e).split())
            raise VlprepError(
                f"{name}: invalid JSON after image entry {index} (near byte {reader.offset}): {text}"
            ) from None


def _bad(name: str, where: str, what: str) -> VlprepError:
    return VlprepError(f"{name}: {where}: {what}; is this Visual Genome's file?")


def _strings(name: str, where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(name, where, f"expected a list of strings, got {type(value).__name__} {str(value)[:60]!r}")
    return value


def _list(name: str, where: str, entry: Any, key: str) -> list:
    if not isinstance(entry, dict) or key not in entry:
        raise _bad(name, where, f"expected an object with key {key!r}")
    if not isinstance(entry[key], list):
        raise _bad(name, f"{where}.{key}", f"expected a list, got {type(entry[key]).__name__}")
    return entry[key]


def read_attributes(source: str | Path | BinaryIO, builder: PhraseBuilder, name: str | None = None) -> None:
    """Feed every object annotation of attributes.json into ``builder``."""
    name = name or _name_of(source)
    for i, image in iter_images(source, name):
        where = f"entry {i}"
        for j, a in enumerate(_list(name, where, image, "attributes")):
            w = f"{where}.attributes[{j}]"
            if not isinstance(a, dict):
                raise _bad(name, w, "expected an object")
            synsets = _strings(name, w + ".synsets", a.get("synsets", []))
            attributes = _strings(name, w + ".attributes", a.get("attributes", []))
            builder.add_attributes(synsets, attributes)


def read_relationships(source: str | Path | BinaryIO, builder: PhraseBuilder, name: str | None = None) -> None:
    """Feed every relationship of relationships.json into ``builder``."""
    name = name or _name_of(source)
    for i, image in iter_images(source, name):
        where = f"entry {i}"
        for j, r in enumerate(_list(name, where, image, "relationships")):
            w = f"{where}.relationships[{j}]"
            if not isinstance(r, dict) or not isinstance(r.get("predicate"), str):
                raise _bad(name, w, "expected an object with a string 'predicate'")
            subj = _strings(name, w + ".subject.synsets", _list(name, w + ".subject", r.get("subject"), "synsets"))
            obj = _strings(name, w + ".object.synsets", _list(name, w + ".object", r.get("object"), "synsets"))
            builder.add_relationship(r["predicate"], subj, obj)


def build_phrases(
    attributes: str | Path | BinaryIO,
    relationships: str | Path | BinaryIO,
    attribute_leak: bool = True,
) -> list[str]:
    """The sorted VG phrase list (row order of the caption DB) from the two files (paths, gs:// or streams)."""
    builder = PhraseBuilder(attribute_leak=attribute_leak)
    read_attributes(attributes, builder)
    read_relationships(relationships, builder)
    phrases = builder.phrases()
    log.info(
        "VG phrases: %d from %d attribute annotations and %d relationships (attribute_leak=%s)",
        len(phrases), builder.n_attribute_annotations, builder.n_relationships, attribute_leak,
    )
    return phrases


def write_phrases(phrases: Iterable[str], out: BinaryIO) -> int:
    """Write phrases one per line (UTF-8, ``\\n``); returns the count. Read back with :func:`read_phrases`."""
    n = 0
    for n, phrase in enumerate(phrases, 1):
        if "\n" in phrase:
            raise VlprepError(f"phrase {n - 1} contains a newline; it cannot be written one per line")
        try:
            out.write(phrase.encode("utf-8") + b"\n")
        except UnicodeEncodeError as e:
            raise VlprepError(f"phrase {n - 1} {phrase!r} is not encodable as UTF-8 ({e.reason})") from None
    return n


def read_phrases(stream: BinaryIO) -> list[str]:
    """Phrases written by :func:`write_phrases` (split on ``\\n`` only: a phrase may hold other line breaks)."""
    data = stream.read().decode("utf-8")
    if not data:
        return []
    if not data.endswith("\n"):
        raise VlprepError("phrase file does not end with a newline; it is truncated")
    return data[:-1].split("\n")
