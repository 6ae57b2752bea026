"""The validation layer in front of every FHIR write (bundle, single resource, batch entry,
Bulk NDJSON line, held-resource release).

A payload goes through, in this order, and each step refuses with a 4xx ``FhirError`` (an
OperationOutcome naming the element by a FHIRPath expression) rather than letting the
problem reach the parser, the mappers or the database:

1. ``decode_body``: the bytes as received → text. ``Content-Encoding`` gzip / deflate is
   undone with the decompressed size bounded (413 past ``FHIR_MAX_PAYLOAD_BYTES``: no zip
   bomb), any other coding is 415; the charset is UTF-8 or UTF-16, from the ``charset``
   parameter or the byte order mark (another charset is 415, bytes that are not valid in it
   are 400).
2. ``loads``: the nesting depth is measured on the raw text, strings removed, by a scan that
   does not recurse (``FHIR_MAX_JSON_DEPTH``; Python's ``json`` and the fhir.resources models
   both recurse, and ~150 nested extensions exhaust the interpreter's stack), then JSON is
   parsed with ``NaN`` / ``Infinity`` and non-finite numbers refused.
3. ``check_document``: one iterative walk of the payload: no repeated key (the keys counted
   in the text against the parsed objects), arrays of bounded length, no control character
   FHIR forbids (below U+0020 except tab, CR, LF) and no lone surrogate in any string or key;
   ``id`` matches FHIR's ``[A-Za-z0-9\\-.]{1,64}``; an identifier system in the registry's
   feed namespace ``urn:vbq-registry:feed:<feed>:`` belongs to the sending feed; contained
   resources are not nested and every ``#local`` reference names one of them.

Column lengths and integer ranges are checked where the mapped values are known
(``integrations.fhir.limits``), dates are bounded where they are converted
(``integrations.fhir.parse.fhir_datetime``).
"""

from __future__ import annotations

import codecs
import itertools
import json
import math
import re
import zlib
from collections.abc import Iterable
from typing import Any

from django.conf import settings

from integrations.fhir.errors import FhirError

FEED_NAMESPACE = "urn:vbq-registry:feed:"
ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# Characters FHIR strings may not hold (below U+0020 except tab, LF, CR), and lone surrogates
# (``\ud800`` escapes: not encodable, refused by PostgreSQL).
FORBIDDEN_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
# The JSON escapes that can spell a forbidden character (\b, \f, \u0000-\u001f, surrogates);
# a match (even a false one, after an escaped backslash) makes every string be searched.
_FORBIDDEN_ESCAPES = re.compile(r"\\(?:[bf]|u00[01][0-9a-fA-F]|u[dD][89a-fA-F])")
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}.__getitem__
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_CHARSETS = {"utf-8": "utf-8", "utf8": "utf-8", "utf-16": "utf-16", "utf-16le": "utf-16-le",
             "utf-16be": "utf-16-be", "utf16": "utf-16"}


def _max_bytes() -> int:
    return int(settings.FHIR_MAX_PAYLOAD_BYTES)


def too_large(what: str = "payload") -> FhirError:
    return FhirError.single(413, "too-costly", f"the {what} is larger than {_max_bytes()} bytes")


def _inflate(raw: bytes, wbits: int) -> bytes:
    """Decompress with the output bounded by ``FHIR_MAX_PAYLOAD_BYTES`` (413 past it)."""
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(raw, _max_bytes() + 1)
    except zlib.error as exc:
        raise FhirError.single(400, "structure", f"the body is not valid compressed data: "
                               f"{exc}") from exc
    if len(out) > _max_bytes() or inflater.unconsumed_tail:
        raise too_large("decompressed payload")
    if not inflater.eof:
        raise FhirError.single(400, "structure", "the compressed body is truncated")
    if inflater.unused_data.strip(b"\x00"):
        raise FhirError.single(400, "structure", "data follows the compressed body")
    return out


def decompress(raw: bytes, content_encoding: str) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate, identity); anything else is 415."""
    coding = content_encoding.strip().lower()
    if coding in {"", "identity"}:
        return raw
    if coding in {"gzip", "x-gzip"}:
        return _inflate(raw, 16 + zlib.MAX_WBITS)
    if coding == "deflate":  # zlib-wrapped as the RFC says; raw deflate as some clients send
        return _inflate(raw, zlib.MAX_WBITS if raw[:1] == b"\x78" else -zlib.MAX_WBITS)
    raise FhirError.single(415, "not-supported", f"Content-Encoding {content_encoding!r} is not "
                           "supported (gzip, deflate or none)")


def decode_text(raw: bytes, charset: str | None) -> str:
    """The text of a JSON body: the ``charset`` parameter (UTF-8 or UTF-16), else the byte
    order mark, else UTF-8. A byte order mark is removed; another charset is 415."""
    name = (charset or "").strip().strip('"').lower()
    if name and name not in _CHARSETS:
        raise FhirError.single(415, "not-supported", f"charset {charset!r} is not supported "
                               "(utf-8 or utf-16)")
    encoding = _CHARSETS.get(name, "")
    if raw.startswith(codecs.BOM_UTF8) and encoding in {"", "utf-8"}:
        encoding, raw = "utf-8", raw[len(codecs.BOM_UTF8):]
    elif raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)) and not encoding:
        raise FhirError.single(415, "not-supported", "UTF-32 is not supported (utf-8 or utf-16)")
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and encoding in {
            "", "utf-16"}:
        encoding = "utf-16"
    encoding = encoding or "utf-8"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise FhirError.single(400, "structure", f"the body is not valid {encoding} "
                               f"(byte {exc.start})") from exc
    return text.removeprefix("\ufeff")


def decode_body(raw: bytes, *, content_encoding: str = "", charset: str | None = None) -> str:
    """Bytes as received → JSON text (``decompress`` then ``decode_text``)."""
    return decode_text(decompress(raw, content_encoding), charset)


def shape(text: str) -> tuple[int, int]:
    """(deepest nesting of arrays and objects, number of object keys) of JSON ``text``,
    without recursion: strings are removed (a bracket or colon inside one does not count),
    then the brackets are counted, and the colons (one per key)."""
    bare = _STRINGS.sub("", text)
    brackets = _NOT_BRACKETS.sub("", bare)
    return max(itertools.accumulate(map(_DEPTH_STEP, brackets)), default=0), bare.count(":")


def _constant(name: str) -> Any:
    raise FhirError.single(400, "structure", f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FhirError.single(400, "value", f"the number {text[:40]} is out of range")
    return value


class Document:
    """A parsed JSON payload, the number of keys its text holds (``keys``: fewer keys in the
    parsed objects than in the text means a key was repeated) and whether its text has an
    escape that can spell a forbidden character (``escapes``: if not, no string of it can
    hold one, since JSON refuses raw control characters, and ``check_document`` does not
    search them)."""

    __slots__ = ("data", "escapes", "keys")

    def __init__(self, data: Any, keys: int, escapes: bool = True) -> None:
        self.data = data
        self.keys = keys
        self.escapes = escapes


def loads(text: str, *, where: str = "") -> Document:
    """Parse JSON text after checking its nesting depth (400 past ``FHIR_MAX_JSON_DEPTH``);
    NaN / Infinity and numbers out of range are 400."""
    limit = int(settings.FHIR_MAX_JSON_DEPTH)
    depth, keys = shape(text)
    if depth > limit:
        raise FhirError.single(400, "too-costly", f"the JSON is nested more than {limit} "
                               "levels deep", where)
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_float)
        return Document(data, keys, bool(_FORBIDDEN_ESCAPES.search(text)))
    except FhirError as exc:
        raise (exc.prefixed(where) if where else exc) from None
    except (ValueError, RecursionError) as exc:  # (JSONDecodeError; a number of 4,300+ digits)
        raise FhirError.single(400, "structure", f"the body is not valid JSON: {exc}"[:300],
                               where) from exc


def _render(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _namespace_owner_ok(system: str, feed_name: str) -> bool:
    """Whether ``system`` is outside the feed namespace, or in the sending feed's own part of
    it (``urn:vbq-registry:feed:<feed>:<Type>``; a remainder with another colon would be
    another feed's whose name starts with ``<feed>:``)."""
    text = system.strip()
    if text[: len(FEED_NAMESPACE)].lower() != FEED_NAMESPACE:
        return True
    own = f"{FEED_NAMESPACE}{feed_name}:"
    return text.startswith(own) and ":" not in text[len(own):]


def check_feed_system(system: str, feed_name: str, where: str) -> None:
    """403 when ``system`` is in another feed's part of the registry's feed namespace."""
    if not _namespace_owner_ok(system, feed_name):
        raise FhirError.single(403, "forbidden", "identifier systems under "
                               f"{FEED_NAMESPACE}<feed>: are written only by that feed", where)


def _bad_string(path: tuple[Any, ...]) -> FhirError:
    return FhirError.single(400, "invalid", "the string holds a character FHIR forbids (a "
                            "control character below U+0020 other than tab, CR, LF, or a lone "
                            "surrogate)", _render(path))


class _Resource:
    __slots__ = ("data", "local_refs", "path")

    def __init__(self, data: dict[str, Any], path: tuple[Any, ...]) -> None:
        self.data = data
        self.path = path
        self.local_refs: list[str] = []


def _path(ref: Any) -> tuple[Any, ...]:
    """The path a walk reference ``(parent reference, key)`` stands for."""
    parts: list[Any] = []
    while isinstance(ref, tuple):
        ref, key = ref
        parts.append(key)
    parts.append(ref)
    return tuple(reversed(parts))


def _walk(value: Any, root: str, feed_name: str, strings: bool) -> tuple[int, list[_Resource]]:
    """Check, without recursion, the length of every array (``FHIR_MAX_ARRAY_ITEMS``; a
    Bundle's ``entry``: ``FHIR_MAX_BUNDLE_ENTRIES``), every identifier system, and (when
    ``strings``) every string and key; return the number of keys met and the resources met
    (each with the ``#local`` references inside it; a contained resource's belong to its
    container). A node's path is kept as a ``(parent, key)`` reference and spelled out only
    for an error."""
    max_items = int(settings.FHIR_MAX_ARRAY_ITEMS)
    entries = value.get("entry") if isinstance(value, dict) and value.get(
        "resourceType") == "Bundle" else None
    if isinstance(entries, list) and len(entries) > int(settings.FHIR_MAX_BUNDLE_ENTRIES):
        raise FhirError.single(413, "too-costly", f"the bundle has more than "
                               f"{settings.FHIR_MAX_BUNDLE_ENTRIES} entries: split it",
                               f"{root}.entry")
    forbidden = FORBIDDEN_CHARS.search if strings else None
    keys = 0
    resources: list[_Resource] = []
    stack: list[tuple[Any, Any, _Resource | None]] = [(value, root, None)]
    while stack:
        node, ref, owner = stack.pop()
        if type(node) is dict:
            keys += len(node)
            if "resourceType" in node and isinstance(node["resourceType"], str) and not (
                    isinstance(ref, tuple) and isinstance(ref[0], tuple)
                    and ref[0][1] == "contained"):
                owner = _Resource(node, _path(ref))
                resources.append(owner)
            for key, item in node.items():
                if forbidden is not None and forbidden(key):
                    raise _bad_string(_path(ref))
                if type(item) is str:
                    if forbidden is not None and forbidden(item):
                        raise _bad_string(_path((ref, key)))
                    if key == "system" and not _namespace_owner_ok(item, feed_name):
                        check_feed_system(item, feed_name, _render(_path((ref, key))))
                    elif key == "reference" and owner is not None and item.startswith("#"):
                        owner.local_refs.append(item)
                elif type(item) is dict or type(item) is list:
                    stack.append((item, (ref, key), owner))
        elif type(node) is list:
            if len(node) > max_items and node is not entries:
                raise FhirError.single(413, "too-costly", f"the array has more than "
                                       f"{max_items} items", _render(_path(ref)))
            for index, item in enumerate(node):
                if type(item) is str:
                    if forbidden is not None and forbidden(item):
                        raise _bad_string(_path((ref, index)))
                elif type(item) is dict or type(item) is list:
                    stack.append((item, (ref, index), owner))
    return keys, resources


def _check_id(resource: dict[str, Any], where: str) -> None:
    if "id" in resource:
        rid = resource["id"]
        if not isinstance(rid, str) or not ID_RE.fullmatch(rid):
            raise FhirError.single(400, "value", "id must match [A-Za-z0-9\\-.]{1,64}",
                                   f"{where}.id")


def _check_contained(resource: dict[str, Any], where: str, local_refs: Iterable[str]) -> None:
    contained = resource.get("contained")
    ids: set[str] = set()
    if contained is not None:
        if not isinstance(contained, list):
            raise FhirError.single(400, "structure", "contained must be a list",
                                   f"{where}.contained")
        for n, inner in enumerate(contained):
            at = f"{where}.contained[{n}]"
            if not isinstance(inner, dict):
                raise FhirError.single(400, "structure", "a contained resource must be an "
                                       "object", at)
            if "contained" in inner:
                raise FhirError.single(400, "invalid", "contained resources cannot contain "
                                       "resources", f"{at}.contained")
            if not isinstance(inner.get("id"), str) or not inner["id"]:
                raise FhirError.single(400, "required", "a contained resource needs an id",
                                       f"{at}.id")
            _check_id(inner, at)
            if inner["id"] in ids:
                raise FhirError.single(400, "invalid", "two contained resources have the same "
                                       "id", f"{at}.id")
            ids.add(inner["id"])
    for ref in local_refs:
        if ref != "#" and ref[1:] not in ids:
            raise FhirError.single(400, "not-found", f"the local reference {ref[:70]} names no "
                                   "contained resource", f"{where}.contained")


def check_document(document: Any, *, feed_name: str, root: str = "") -> None:
    """The content checks of a parsed payload (a Bundle, a resource, a stored held resource:
    see the module docstring). ``document``: a ``Document`` (its repeated keys are found
    too) or parsed JSON; ``root``: the expression prefix of its top (default: its
    resourceType)."""
    data = document.data if isinstance(document, Document) else document
    if not isinstance(data, dict | list):
        return  # (the caller answers "a resource must be a JSON object")
    kind = data.get("resourceType") if isinstance(data, dict) else None
    name = root or (kind if isinstance(kind, str) and ID_RE.fullmatch(kind) else "resource")
    strings = not isinstance(document, Document) or document.escapes
    keys, resources = _walk(data, name, feed_name, strings)
    if isinstance(document, Document) and keys != document.keys:
        raise FhirError.single(400, "structure", "an object of the JSON has the same key more "
                               "than once", name)
    for resource in resources:
        where = _render(resource.path)
        _check_id(resource.data, where)
        _check_contained(resource.data, where, resource.local_refs)


def check_query(value: str, where: str) -> None:
    """A search or condition parameter: no forbidden character (400)."""
    if FORBIDDEN_CHARS.search(value):
        raise FhirError.single(400, "invalid", "the parameter holds a control character", where)
