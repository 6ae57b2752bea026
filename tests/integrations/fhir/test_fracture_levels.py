"""A fracture Condition's vertebral level: ICD-10-CM code and bodySite together (SYNTHETIC)."""

import copy
import json
from pathlib import Path

import pytest

from registry.feeds import feed_create
from registry.models import Fracture

pytestmark = pytest.mark.django_db
FIXTURES = Path(__file__).parent / "fixtures"


def _bundle_with_condition(code, body_site):
    bundle = json.loads((FIXTURES / "transaction-hl7-example-shapes.json").read_text())
    condition = copy.deepcopy(bundle["entry"][3])
    condition["resource"]["code"] = {"coding": [{
        "system": "http://hl7.org/fhir/sid/icd-10-cm", "code": code,
        "display": "Wedge compression fracture of vertebra, SYNTHETIC"}]}
    condition["resource"]["bodySite"] = [{"text": t} for t in body_site]
    bundle["entry"] = [bundle["entry"][0], condition]
    return bundle


@pytest.mark.parametrize(
    ("code", "body_site", "level"),
    [
        ("S22.080A", ["T12"], "T12"),
        ("S22.060A", ["T8"], "T8"),  # S22.06 is T7–T8 (it was read as T11)
        ("S22.050A", [], ""),  # T5–T6 with no body site: no single level
        ("S22.020A", [], "T2"),  # S22.02 is the second thoracic vertebra (it was read as T3)
    ],
)
def test_a_fracture_condition_records_the_level_its_code_and_body_site_agree_on(
    client, code, body_site, level
):
    token = feed_create(name="levels-ehr")[1]
    response = client.post("/fhir", data=json.dumps(_bundle_with_condition(code, body_site)),
                           content_type="application/fhir+json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.json()
    assert Fracture.objects.get().vertebral_level == level
