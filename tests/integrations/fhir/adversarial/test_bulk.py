"""Bulk Data NDJSON through the same validation layer: each hostile line is refused with its
reason and writes nothing, the good lines around it are imported (SYNTHETIC data)."""

from __future__ import annotations

import json

import pytest

from integrations.fhir.bulk import import_ndjson
from integrations.fhir.context import Context
from registry.feeds import feed_create
from registry.models import Feed, PatientIdentifier
from registry.side_effects import Actor
from tests.integrations.fhir.adversarial.helpers import counts, delta, patient

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

BAD_LINES = [
    ("nul-escape", json.dumps(patient("SYN-B-NUL", name=[{"family": "A\u0000"}])).encode(), 400),
    ("raw-nul", json.dumps(patient("SYN-B-RAW")).encode() + b"\x00", 400),
    ("deep", b'{"resourceType": "Patient", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    ("nan", b'{"resourceType": "Patient", "x": NaN}', 400),
    ("dup-key", b'{"resourceType": "Patient", "resourceType": "Procedure"}', 400),
    ("latin1", json.dumps(patient("SYN-B-\u00e9"), ensure_ascii=False).encode("latin-1"), 400),
    ("long-value", json.dumps(patient("v" * 300)).encode(), 422),
    ("other-feed", json.dumps(patient(identifier=[
        {"system": "urn:vbq-registry:feed:someone-else:Patient", "value": "x"}])).encode(), 403),
    ("year-9999", json.dumps(patient("SYN-B-9999", birthDate="9999-01-01")).encode(), 422),
    ("gender", json.dumps(patient("SYN-B-G", gender="x")).encode(), 400),
]


@pytest.mark.parametrize(("line", "status"), [b[1:] for b in BAD_LINES],
                         ids=[b[0] for b in BAD_LINES])
def test_a_hostile_ndjson_line_is_refused_and_the_others_are_imported(tmp_path, line, status):
    feed, _ = feed_create(name="bulk-adv")
    good = [json.dumps(patient(f"SYN-B-{n}")).encode() for n in range(2)]
    (tmp_path / "Patient.ndjson").write_bytes(b"\n".join([good[0], line, good[1]]) + b"\n")
    before = counts()
    summary = import_ndjson(tmp_path, Context(feed_name=feed.name,
                                              actor=Actor(feed_id=feed.pk, via="fhir")),
                            Feed.objects.get(pk=feed.pk).allows)
    assert summary.by_status[status] == 1, (summary.by_status, summary.errors)
    assert "Patient.ndjson:2" in summary.errors[0]
    assert delta(before, counts()) == {"registry.Patient": 2, "registry.PatientIdentifier": 2}
    assert set(PatientIdentifier.objects.values_list("value", flat=True)) == {
        "SYN-B-0", "SYN-B-1"}
