"""Adversarial FHIR requests, transport and JSON: media types, Content-Encoding, charsets and
byte order marks, sizes, broken and hostile JSON (depth, duplicate keys, NaN, huge numbers).
Each case: the status, the OperationOutcome, the row counts before and after, and the raw
payload stored as the bytes received with its outcome (SYNTHETIC data)."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import zlib

import pytest

from integrations.models import InboundMessage
from tests.integrations.fhir.adversarial.helpers import (
    FHIR,
    assert_refused,
    bundle,
    counts,
    delta,
    patient,
)

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

GOOD = json.dumps(bundle("transaction", patient()))
ONE_PATIENT = {"registry.Patient": 1, "registry.PatientIdentifier": 1}


def _deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


def _nested(depth: int) -> str:
    return '{"resourceType": "Bundle", "type": "transaction", "x": ' + "[" * depth + \
        "]" * depth + "}"


def _nested_objects(depth: int) -> str:
    return '{"resourceType": "Bundle", "type": "transaction", "x": ' + '{"a": ' * depth + \
        "1" + "}" * depth + "}"


def _extensions(depth: int) -> str:
    ext: dict = {"url": "http://example.org/ext", "valueString": "SYNTHETIC"}
    for _ in range(depth):
        ext = {"url": "http://example.org/ext", "extension": [ext]}
    return json.dumps(bundle("transaction", patient(extension=[ext])))


# (id, body bytes, Content-Type, extra headers, status, expression in the outcome)
REFUSED = [
    ("text-plain", GOOD.encode(), "text/plain", {}, 415, None),
    ("xml", b"<Bundle xmlns='http://hl7.org/fhir'/>", "application/fhir+xml", {}, 415, None),
    ("no-content-type", GOOD.encode(), "", {}, 415, None),
    ("form-urlencoded", b"resourceType=Bundle", "application/x-www-form-urlencoded", {}, 415,
     None),
    ("multipart", GOOD.encode(), "multipart/form-data; boundary=x", {}, 415, None),
    ("brotli-coding", GOOD.encode(), FHIR, {"HTTP_CONTENT_ENCODING": "br"}, 415, None),
    ("two-codings", gzip.compress(gzip.compress(GOOD.encode())), FHIR,
     {"HTTP_CONTENT_ENCODING": "gzip, gzip"}, 415, None),
    ("gzip-not-gzip", GOOD.encode(), FHIR, {"HTTP_CONTENT_ENCODING": "gzip"}, 400, None),
    ("gzip-truncated", gzip.compress(GOOD.encode())[:40], FHIR,
     {"HTTP_CONTENT_ENCODING": "gzip"}, 400, None),
    ("gzip-trailing-garbage", gzip.compress(GOOD.encode()) + b"GARBAGE", FHIR,
     {"HTTP_CONTENT_ENCODING": "gzip"}, 400, None),
    ("deflate-garbage", b"\x78\x9c garbage", FHIR, {"HTTP_CONTENT_ENCODING": "deflate"}, 400,
     None),
    ("charset-latin1", GOOD.encode(), f"{FHIR}; charset=iso-8859-1", {}, 415, None),
    ("charset-utf32", GOOD.encode("utf-32"), f"{FHIR}; charset=utf-32", {}, 415, None),
    ("charset-bogus", GOOD.encode(), f"{FHIR}; charset=klingon", {}, 415, None),
    ("utf32-bom", GOOD.encode("utf-32"), FHIR, {}, 415, None),
    ("invalid-utf8", GOOD.encode()[:-2] + b"\xff\xfe\xfa}", FHIR, {}, 400, None),
    ("overlong-utf8", b'{"resourceType": "Bundle\xc0\xaf"}', FHIR, {}, 400, None),
    ("utf16-declared-utf8-sent", b'{"a": 1}', f"{FHIR}; charset=utf-16", {}, 400, None),
    ("latin1-bytes-as-utf8", GOOD.replace("Adversaria", "Ad\u00e9le").encode("latin-1"), FHIR,
     {}, 400, None),
    ("nul-after-json", GOOD.encode() + b"\x00", FHIR, {}, 400, None),
    ("nul-before-json", b"\x00" + GOOD.encode(), FHIR, {}, 400, None),
    ("nul-inside-json-raw", GOOD.encode().replace(b"Adversaria", b"Adver\x00saria"), FHIR, {},
     400, None),
    ("empty-body", b"", FHIR, {}, 400, None),
    ("whitespace-body", b"   \r\n\t ", FHIR, {}, 400, None),
    ("bom-only", codecs.BOM_UTF8, FHIR, {}, 400, None),
    ("not-json", b"{not json", FHIR, {}, 400, None),
    ("truncated-json", GOOD.encode()[:-5], FHIR, {}, 400, None),
    ("trailing-comma", b'{"resourceType": "Bundle", "type": "transaction", "entry": [],}',
     FHIR, {}, 400, None),
    ("single-quotes", b"{'resourceType': 'Bundle'}", FHIR, {}, 400, None),
    ("two-documents", (GOOD + GOOD).encode(), FHIR, {}, 400, None),
    ("json-array", b"[]", FHIR, {}, 400, None),
    ("json-string", b'"Bundle"', FHIR, {}, 400, None),
    ("json-null", b"null", FHIR, {}, 400, None),
    ("json-number", b"42", FHIR, {}, 400, None),
    ("nan", GOOD.replace('"gender"', '"x": NaN, "gender"').encode(), FHIR, {}, 400, None),
    ("infinity", GOOD.replace('"gender"', '"x": Infinity, "gender"').encode(), FHIR, {}, 400,
     None),
    ("minus-infinity", GOOD.replace('"gender"', '"x": -Infinity, "gender"').encode(), FHIR,
     {}, 400, None),
    ("float-overflow", GOOD.replace('"gender"', '"x": 1e999, "gender"').encode(), FHIR, {},
     400, None),
    ("int-5000-digits", GOOD.replace('"gender"', '"x": ' + "9" * 5000 + ', "gender"').encode(),
     FHIR, {}, 400, None),
    ("duplicate-key-top", b'{"resourceType": "Bundle", "type": "batch", "type": "transaction",'
     b' "entry": []}', FHIR, {}, 400, "Bundle"),
    ("duplicate-key-in-resource", GOOD.replace('"gender": "female"',
                                               '"gender": "female", "gender": "male"').encode(),
     FHIR, {}, 400, None),
    ("nested-arrays-10000", _nested(10_000).encode(), FHIR, {}, 400, None),
    ("nested-objects-10000", _nested_objects(10_000).encode(), FHIR, {}, 400, None),
    ("nested-arrays-65", _nested(65).encode(), FHIR, {}, 400, None),
    ("nested-extensions-150", _extensions(150).encode(), FHIR, {}, 400, None),
    ("nested-extensions-40", _extensions(40).encode(), FHIR, {}, 400, None),
    ("brackets-in-strings-do-not-count-but-json-is-bad", b'{"a": "[[[[[[" ', FHIR, {}, 400,
     None),
]


@pytest.mark.parametrize(("body", "content_type", "headers", "status", "expression"),
                         [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_hostile_or_broken_payload_is_refused_and_stored_raw(
        send, body, content_type, headers, status, expression):
    before = counts()
    response = send("POST", "/fhir", body, content_type=content_type, **headers)
    assert_refused(response, status, expression)
    assert delta(before, counts()) == {}
    message = InboundMessage.objects.latest("pk")
    assert bytes(message.body) == body  # the bytes as received, NULs and all
    assert message.sha256 == hashlib.sha256(body).hexdigest()
    assert (message.outcome, message.status_code) == ("rejected", status)


ACCEPTED = [
    ("gzip", gzip.compress(GOOD.encode()), FHIR, {"HTTP_CONTENT_ENCODING": "gzip"}),
    ("x-gzip", gzip.compress(GOOD.encode()), FHIR, {"HTTP_CONTENT_ENCODING": "x-gzip"}),
    ("deflate-zlib", zlib.compress(GOOD.encode()), FHIR, {"HTTP_CONTENT_ENCODING": "deflate"}),
    ("deflate-raw", _deflate_raw(GOOD.encode()), FHIR, {"HTTP_CONTENT_ENCODING": "deflate"}),
    ("identity", GOOD.encode(), FHIR, {"HTTP_CONTENT_ENCODING": "identity"}),
    ("utf16-charset-with-bom", GOOD.encode("utf-16"), f"{FHIR}; charset=utf-16", {}),
    ("utf16le-bom-no-charset", codecs.BOM_UTF16_LE + GOOD.encode("utf-16-le"), FHIR, {}),
    ("utf16be-bom-no-charset", codecs.BOM_UTF16_BE + GOOD.encode("utf-16-be"), FHIR, {}),
    ("utf16le-charset-no-bom", GOOD.encode("utf-16-le"), f"{FHIR}; charset=UTF-16LE", {}),
    ("utf8-bom", codecs.BOM_UTF8 + GOOD.encode(), FHIR, {}),
    ("utf8-charset-quoted", GOOD.encode(), f'{FHIR}; charset="UTF-8"', {}),
    ("application-json", GOOD.encode(), "application/json", {}),
    ("fhir-version-parameter", GOOD.encode(), f"{FHIR}; fhirVersion=4.3", {}),
    ("gzip-utf16", gzip.compress(GOOD.encode("utf-16")), f"{FHIR}; charset=utf-16",
     {"HTTP_CONTENT_ENCODING": "gzip"}),
    ("nested-extensions-20", _extensions(20).encode(), FHIR, {}),
]


@pytest.mark.parametrize(("body", "content_type", "headers"), [c[1:] for c in ACCEPTED],
                         ids=[c[0] for c in ACCEPTED])
def test_an_encoded_payload_is_decoded_and_written_once(send, body, content_type, headers):
    before = counts()
    response = send("POST", "/fhir", body, content_type=content_type, **headers)
    assert response.status_code == 200, response.content[:600]
    assert [e["response"]["status"] for e in response.json()["entry"]] == ["201 Created"]
    assert delta(before, counts()) == ONE_PATIENT
    message = InboundMessage.objects.latest("pk")
    assert bytes(message.body) == body
    assert message.outcome == "accepted"


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read(send, settings):
    settings.FHIR_MAX_PAYLOAD_BYTES = 1000
    before = counts()
    response = send("POST", "/fhir", GOOD, CONTENT_LENGTH="50000000")
    assert_refused(response, 413)
    assert delta(before, counts()) == {}
    message = InboundMessage.objects.latest("pk")
    assert (bytes(message.body), message.status_code, message.size_bytes) == (b"", 413,
                                                                             50_000_000)


def test_a_body_over_the_limit_is_413(send, settings):
    settings.FHIR_MAX_PAYLOAD_BYTES = 100
    before = counts()
    assert_refused(send("POST", "/fhir", GOOD), 413)
    assert delta(before, counts()) == {}


def test_a_gzip_bomb_is_413_without_inflating_it_all(send, settings):
    settings.FHIR_MAX_PAYLOAD_BYTES = 1_000_000
    bomb = gzip.compress(b" " * 50_000_000)  # ~50 kB that inflate to 50 MB
    before = counts()
    assert_refused(send("POST", "/fhir", bomb, HTTP_CONTENT_ENCODING="gzip"), 413)
    assert delta(before, counts()) == {}
    assert bytes(InboundMessage.objects.latest("pk").body) == bomb


def test_a_content_length_that_is_not_a_number_is_400(send):
    before = counts()
    assert_refused(send("POST", "/fhir", GOOD, CONTENT_LENGTH="12abc"), 400)
    assert delta(before, counts()) == {}


def test_a_nul_in_a_single_resource_body_is_stored_raw_and_refused(send):
    body = json.dumps(patient()).encode() + b"\x00\x00"
    before = counts()
    assert_refused(send("PUT", "/fhir/Patient?identifier=x|y", body), 400)
    assert delta(before, counts()) == {}
    assert bytes(InboundMessage.objects.latest("pk").body) == body


def test_a_bundle_with_too_many_entries_is_413(send, settings):
    settings.FHIR_MAX_BUNDLE_ENTRIES = 3
    body = bundle("transaction", *[patient(f"SYN-MANY-{n}") for n in range(4)])
    before = counts()
    assert_refused(send("POST", "/fhir", body), 413, "Bundle.entry")
    assert delta(before, counts()) == {}


def test_an_oversized_array_inside_a_resource_is_413(send):
    many = patient(identifier=[{"system": "urn:syn", "value": f"SYN-{n}"} for n in range(1001)])
    before = counts()
    assert_refused(send("POST", "/fhir", bundle("transaction", many)), 413,
                   "Bundle.entry[0].resource.identifier")
    assert delta(before, counts()) == {}
