"""Adversarial bundles and conditional requests: transaction semantics (DELETE and other
methods, fullUrls, request urls, conditions with 0, 1 or several matches, If-Match),
bundle types, and batches whose entries fail or crash one by one while the others are
written and the answer stays 200 (SYNTHETIC data)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from integrations.fhir import mappers
from integrations.models import InboundMessage
from registry.models import Patient, PatientIdentifier, Procedure
from tests.integrations.fhir.adversarial.helpers import (
    MRN,
    assert_refused,
    bundle,
    counts,
    delta,
    patient,
    procedure,
)

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

ONE = {"registry.Patient": 1, "registry.PatientIdentifier": 1}


def _entry_request(request: Any, resource: dict[str, Any] | None = None) -> dict[str, Any]:
    b = bundle("transaction", patient(), resource or procedure())
    b["entry"][1]["request"] = request
    return b


def _b(**changes: Any) -> dict[str, Any]:
    b = bundle("transaction", patient(), procedure())
    b.update(changes)
    return b


def _entries(entries: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _dup_full_url() -> dict[str, Any]:
    b = bundle("transaction", patient(), procedure())
    b["entry"][1]["fullUrl"] = b["entry"][0]["fullUrl"]
    return b


def _full_url(value: Any) -> dict[str, Any]:
    b = bundle("transaction", patient(), procedure())
    b["entry"][1]["fullUrl"] = value
    return b


TX_REFUSED = [
    ("delete", _entry_request({"method": "DELETE", "url": "Procedure/1"}), 400,
     "request.method"),
    ("patch", _entry_request({"method": "PATCH", "url": "Procedure/1"}), 400, "request.method"),
    ("get", _entry_request({"method": "GET", "url": "Procedure?identifier=a|b"}), 400,
     "request.method"),
    ("head", _entry_request({"method": "HEAD", "url": "Procedure"}), 400, "request.method"),
    ("unknown-method", _entry_request({"method": "FROB", "url": "Procedure"}), 400,
     "request.method"),
    ("method-missing", _entry_request({"url": "Procedure"}), 400, "request.method"),
    ("method-number", _entry_request({"method": 1, "url": "Procedure"}), 400,
     "request.method"),
    ("request-not-object", _entry_request("POST Procedure"), 400, "request"),
    ("url-missing", _entry_request({"method": "POST"}), 400, "request.url"),
    ("url-number", _entry_request({"method": "POST", "url": 5}), 400, "request.url"),
    ("url-other-type", _entry_request({"method": "POST", "url": "Patient"}), 400,
     "request.url"),
    ("url-deep-path", _entry_request({"method": "PUT", "url": "Procedure/1/_history/2"}), 400,
     "request.url"),
    ("put-without-id", _entry_request({"method": "PUT", "url": "Procedure"}), 400,
     "request.url"),
    ("put-bad-id", _entry_request({"method": "PUT", "url": "Procedure/a b"}), 400,
     "request.url"),
    ("put-id-mismatch", _entry_request({"method": "PUT", "url": "Procedure/one"},
                                       {**procedure(), "id": "two"}), 400, "resource.id"),
    ("post-with-id", _entry_request({"method": "POST", "url": "Procedure/1"}), 400,
     "request.url"),
    ("put-unsupported-param", _entry_request({"method": "PUT", "url": "Procedure?status=x"}),
     400, "request.url"),
    ("if-none-exist-unsupported", _entry_request({"method": "POST", "url": "Procedure",
                                                  "ifNoneExist": "_id=5"}), 400,
     "ifNoneExist"),
    ("if-none-exist-empty", _entry_request({"method": "POST", "url": "Procedure",
                                            "ifNoneExist": "identifier="}), 400,
     "ifNoneExist"),
    ("if-none-exist-not-string", _entry_request({"method": "POST", "url": "Procedure",
                                                 "ifNoneExist": {"identifier": "a|b"}}), 400,
     "ifNoneExist"),
    ("if-none-exist-nul", _entry_request({"method": "POST", "url": "Procedure",
                                          "ifNoneExist": "identifier=a|\u0000"}), 400, None),
    ("if-match", _entry_request({"method": "PUT", "url": "Procedure/p1",
                                 "ifMatch": 'W/"1"'}), 412, "ifMatch"),
    ("duplicate-full-url", _dup_full_url(), 400, "Bundle.entry[1].fullUrl"),
    ("full-url-number", _full_url(42), 400, "fullUrl"),
    ("full-url-empty", _full_url(""), 400, "fullUrl"),
    ("full-url-object", _full_url({"a": 1}), 400, "fullUrl"),
    ("full-url-null", _full_url(None), 400, "fullUrl"),
    ("type-searchset", _b(type="searchset"), 400, "Bundle.type"),
    ("type-collection", _b(type="collection"), 400, "Bundle.type"),
    ("type-document", _b(type="document"), 400, "Bundle.type"),
    ("type-history", _b(type="history"), 400, "Bundle.type"),
    ("type-missing", {k: v for k, v in _b().items() if k != "type"}, 400, "Bundle.type"),
    ("type-number", _b(type=7), 400, "Bundle.type"),
    ("not-a-bundle", patient(), 400, "resourceType"),
    ("entry-not-list", _b(entry={"resource": patient()}), 400, "Bundle.entry"),
    ("entry-item-not-object", _entries([{"resource": patient()}, "Procedure"]), 400,
     "Bundle.entry[1]"),
    ("entry-without-resource", _entries([{"resource": patient()}, {"fullUrl": "urn:x"}]), 400,
     "Bundle.entry[1].resource"),
    ("resource-is-list", _entries([{"resource": patient()}, {"resource": [procedure()]}]), 400,
     "Bundle.entry[1].resource"),
    ("good-then-unknown-patient-urn", _entries([{"resource": patient()}, {"resource": {
        **procedure(), "subject": {"reference": "urn:uuid:0000dead-0000-4000-8000-000000000000"
                                   }}}]), 400, "subject.reference"),
    ("bundle-in-bundle", _entries([{"resource": patient()},
                                   {"resource": bundle("transaction", patient("SYN-X"))}]),
     400, "Bundle.entry[1]"),
]


@pytest.mark.parametrize(("body", "status", "expression"), [c[1:] for c in TX_REFUSED],
                         ids=[c[0] for c in TX_REFUSED])
def test_a_transaction_the_server_cannot_honour_is_refused_whole(send, body, status,
                                                                 expression):
    before = counts()
    assert_refused(send("POST", "/fhir", body), status, expression)
    assert delta(before, counts()) == {}
    assert InboundMessage.objects.latest("pk").outcome == "rejected"


def test_an_empty_transaction_answers_an_empty_response(send):
    before = counts()
    response = send("POST", "/fhir", {"resourceType": "Bundle", "type": "transaction"})
    assert response.status_code == 200
    assert response.json()["entry"] == []
    assert delta(before, counts()) == {}


def test_lower_case_methods_and_entries_without_request_are_upserts(send):
    b = bundle("transaction", patient(), procedure())
    b["entry"][0]["request"] = {"method": "put", "url": f"Patient?identifier={MRN}|SYN-ADV-0001"}
    del b["entry"][1]["request"]
    before = counts()
    assert send("POST", "/fhir", b).status_code == 200
    assert delta(before, counts()) == {**ONE, "registry.Procedure": 1}


def test_a_put_by_id_in_a_bundle_gives_the_id_to_the_resource(send):
    b = bundle("transaction", patient())
    b["entry"][0]["request"] = {"method": "PUT", "url": "Patient/syn-put-1"}
    assert send("POST", "/fhir", b).status_code == 200
    assert PatientIdentifier.objects.filter(
        system="urn:vbq-registry:feed:adv-ehr:Patient", value="syn-put-1").exists()


@pytest.fixture
def two_patients(send):
    """Two SYNTHETIC patients whose identifiers share the value SYN-TWIN (other systems)."""
    for system in ("urn:syn:a", "urn:syn:b"):
        response = send("POST", "/fhir/Patient", patient(identifier=[
            {"system": system, "value": "SYN-TWIN"}]))
        assert response.status_code == 201, response.content
    assert Patient.objects.count() == 2


def test_if_none_exist_matching_two_patients_is_412(send, two_patients):
    before = counts()
    response = send("POST", "/fhir/Patient", patient("SYN-NEW"),
                    **{"If-None-Exist": "identifier=SYN-TWIN"})
    assert_refused(response, 412, code="multiple-matches")
    assert delta(before, counts()) == {}


def test_a_conditional_update_matching_two_patients_is_412(send, two_patients):
    before = counts()
    response = send("PUT", "/fhir/Patient?identifier=SYN-TWIN", patient("SYN-NEW"))
    assert_refused(response, 412)
    assert delta(before, counts()) == {}


def test_a_transaction_entry_whose_condition_matches_two_is_412_and_nothing_is_written(
        send, two_patients):
    b = bundle("transaction", patient("SYN-NEW"), procedure(patient_key="SYN-NEW"))
    b["entry"][0]["request"] = {"method": "POST", "url": "Patient",
                                "ifNoneExist": "identifier=SYN-TWIN"}
    before = counts()
    assert_refused(send("POST", "/fhir", b), 412, "ifNoneExist")
    assert delta(before, counts()) == {}


def test_if_none_exist_matching_one_answers_it_and_writes_nothing(send, two_patients):
    before = counts()
    response = send("POST", "/fhir/Patient", patient("SYN-NEW"),
                    **{"If-None-Exist": "identifier=urn:syn:a|SYN-TWIN"})
    assert response.status_code == 200, response.content
    assert response["Location"].startswith("Patient/")
    assert delta(before, counts()) == {}


def test_if_none_exist_with_two_parameters_is_an_and(send, two_patients):
    before = counts()
    response = send("POST", "/fhir/Patient", patient("SYN-NEW"), **{
        "If-None-Exist": "identifier=urn:syn:a|SYN-TWIN&identifier=urn:syn:b|SYN-TWIN"})
    assert response.status_code == 201, response.content  # no ONE patient has both
    assert delta(before, counts()) == ONE


@pytest.mark.parametrize("condition", ["_id=1", "name=SYNTHETIC", "identifier",
                                       "birthdate=1950-03-04", "identifier=a|b&_lastUpdated=x",
                                       "", "garbage"])
def test_an_unsupported_condition_is_400_and_creates_nothing(send, condition):
    before = counts()
    response = send("POST", "/fhir/Patient", patient(), **{"If-None-Exist": condition})
    assert_refused(response, 400)
    assert delta(before, counts()) == {}


def test_a_conditional_update_with_no_match_creates(send):
    before = counts()
    response = send("PUT", f"/fhir/Patient?identifier={MRN}|SYN-ADV-0001", patient())
    assert response.status_code == 201, response.content
    assert delta(before, counts()) == ONE


def test_a_put_without_id_or_condition_is_400(send):
    before = counts()
    assert_refused(send("PUT", "/fhir/Patient", patient()), 400)
    assert delta(before, counts()) == {}


def test_if_match_is_412_the_registry_keeps_no_versions(send):
    before = counts()
    assert_refused(send("PUT", "/fhir/Patient/p1", patient(), **{"If-Match": 'W/"3"'}), 412)
    assert delta(before, counts()) == {}


@pytest.mark.parametrize(("path", "body"), [
    ("/fhir/Patient", procedure()),
    ("/fhir/Procedure", patient()),
    ("/fhir/Patient", bundle("transaction", patient())),
    ("/fhir/Patient/p1", {**patient(), "id": "p2"}),
    ("/fhir/Patient", [patient()]),
    ("/fhir/Patient", "Patient"),
    ("/fhir/Patient?identifier=a|b&x=1", patient()),
])
def test_a_body_that_does_not_match_the_url_is_400(send, path, body):
    before = counts()
    method = "PUT" if "?" in path or path.count("/") == 3 else "POST"
    assert_refused(send(method, path, body), 400)
    assert delta(before, counts()) == {}


def test_a_search_with_a_nul_is_400(send):
    assert_refused(send("GET", "/fhir/Patient?identifier=a%7Cb%00"), 400)


@pytest.mark.parametrize("query", ["identifier=SYN-TWIN", "identifier=urn:syn:a%7C",
                                   "identifier=%7CSYN-TWIN"])
def test_a_search_by_part_of_an_identifier_is_400_it_would_list_patients(send, two_patients,
                                                                        query):
    response = send("GET", f"/fhir/Patient?{query}")
    assert_refused(response, 400)
    assert b"SYN-TWIN" not in response.content


def test_a_search_with_sql_finds_nothing(send):
    response = send("GET", "/fhir/Patient?identifier=x%27%20OR%201%3D1--%7Cy")
    assert response.status_code == 200
    assert response.json()["total"] == 0


# --- batch -----------------------------------------------------------------------------------
def _batch(*resources: dict[str, Any]) -> dict[str, Any]:
    return bundle("batch", *resources)


def test_a_batch_writes_the_good_entries_and_answers_each_bad_one(send):
    bad_request = _batch(patient(), procedure(), procedure("P2", performed="1930-01-01T10:00:00Z"),
                         patient("SYN-\u00e9", name=[{"family": "F" * 201}]),
                         procedure("P3"))
    bad_request["entry"][4]["request"] = {"method": "DELETE", "url": "Procedure/1"}
    before = counts()
    response = send("POST", "/fhir", bad_request)
    assert response.status_code == 200, response.content
    statuses = [e["response"]["status"].split()[0] for e in response.json()["entry"]]
    assert statuses == ["201", "201", "422", "422", "400"]
    for n in (2, 3, 4):
        issue = response.json()["entry"][n]["response"]["outcome"]["issue"][0]
        assert any(e.startswith(f"Bundle.entry[{n}]") for e in issue["expression"]), issue
    assert delta(before, counts()) == {**ONE, "registry.Procedure": 1}
    assert InboundMessage.objects.latest("pk").outcome == "partial"


def test_a_batch_entry_that_crashes_gets_its_own_outcome_after_earlier_entries_committed(
        send, monkeypatch):
    original = mappers.MAPPERS["Procedure"]

    def crash(resource, ctx):
        if resource.identifier[0].value == "CRASH":
            raise RuntimeError("SYNTHETIC crash inside a mapper")
        return original(resource, ctx)

    monkeypatch.setitem(mappers.MAPPERS, "Procedure", crash)
    before = counts()
    response = send("POST", "/fhir", _batch(patient(), procedure("OK-1"), procedure("CRASH"),
                                            procedure("OK-2")))
    assert response.status_code == 200, response.content
    statuses = [e["response"]["status"].split()[0] for e in response.json()["entry"]]
    assert statuses == ["201", "201", "422", "201"]
    assert delta(before, counts()) == {**ONE, "registry.Procedure": 2}
    assert sorted(Procedure.objects.values_list("identifier_value", flat=True)) == [
        "OK-1", "OK-2"]


def test_a_batch_entry_that_hits_a_database_error_is_rolled_back_alone(send, monkeypatch):
    from django.db import connection

    original = mappers.MAPPERS["Procedure"]

    def bad_sql(resource, ctx):
        if resource.identifier[0].value == "SQL":
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1/0")  # a DataError, not an IntegrityError
        return original(resource, ctx)

    monkeypatch.setitem(mappers.MAPPERS, "Procedure", bad_sql)
    before = counts()
    response = send("POST", "/fhir", _batch(patient(), procedure("SQL"), procedure("OK")))
    assert response.status_code == 200, response.content
    assert [e["response"]["status"].split()[0] for e in response.json()["entry"]] == [
        "201", "422", "201"]
    assert delta(before, counts()) == {**ONE, "registry.Procedure": 1}


@pytest.mark.parametrize(("entry", "status"), [
    ("not an object", "400"),
    ({"fullUrl": "urn:uuid:0000beef-0000-4000-8000-000000000000"}, "400"),
    ({"resource": {"resourceType": "Observation"}}, "400"),
    ({"resource": procedure("IFM"), "request": {"method": "PUT", "url": "Procedure/x",
                                                "ifMatch": "W/\"1\""}}, "412"),
])
def test_a_bad_batch_entry_is_answered_alone(send, entry, status):
    b = _batch(patient())
    b["entry"].append(copy.deepcopy(entry))
    before = counts()
    response = send("POST", "/fhir", b)
    assert response.status_code == 200, response.content
    assert [e["response"]["status"].split()[0] for e in response.json()["entry"]] == [
        "201", status]
    assert delta(before, counts()) == ONE


def test_a_batch_with_a_duplicate_full_url_is_refused_whole(send):
    b = _batch(patient(), procedure())
    b["entry"][1]["fullUrl"] = b["entry"][0]["fullUrl"]
    before = counts()
    assert_refused(send("POST", "/fhir", b), 400, "fullUrl")
    assert delta(before, counts()) == {}


def test_a_batch_conditional_create_matching_two_is_412_for_that_entry(send, two_patients):
    b = _batch(patient("SYN-NEW-1"), patient("SYN-NEW-2"))
    b["entry"][1]["request"] = {"method": "POST", "url": "Patient",
                                "ifNoneExist": "identifier=SYN-TWIN"}
    before = counts()
    response = send("POST", "/fhir", b)
    assert [e["response"]["status"].split()[0] for e in response.json()["entry"]] == [
        "201", "412"]
    assert delta(before, counts()) == ONE


@pytest.mark.parametrize("path", ["/fhir/Patient?_format=json",
                                  f"/fhir/Patient?_format=json&identifier={MRN}|SYN-ADV-0001",
                                  "/fhir/Patient/p1?_pretty=true"])
def test_result_parameters_are_ignored_on_writes(send, path):
    method = "POST" if path.endswith("json") else "PUT"
    before = counts()
    response = send(method, path, patient())
    assert response.status_code == 201, response.content
    assert delta(before, counts())["registry.Patient"] == 1


def test_an_absolute_request_url_names_the_type_too(send):
    b = bundle("transaction", patient())
    b["entry"][0]["request"] = {"method": "PUT",
                                "url": "https://ehr.example.org/fhir/Patient/syn-abs-1"}
    before = counts()
    assert send("POST", "/fhir", b).status_code == 200
    assert delta(before, counts()) == {"registry.Patient": 1, "registry.PatientIdentifier": 2}
