"""Code sets map the codes EHRs send to registry concepts."""

import pytest

from registry import codes


@pytest.mark.parametrize(
    ("system", "code", "kind"),
    [
        (codes.CPT, "22510", "vertebroplasty"),
        (codes.CPT, "22512", "vertebroplasty"),
        (codes.CPT, "22514", "kyphoplasty"),
        (codes.SNOMED, "392010000", "vertebroplasty"),
        (codes.SNOMED, "429616001", "kyphoplasty"),
        (codes.CPT, "22558", None),
        (codes.ICD10CM, "22510", None),
    ],
)
def test_procedure_codes_map_to_kind(system, code, kind):
    assert codes.procedure_kind(system, code) == kind


@pytest.mark.parametrize(
    ("code", "site"),
    [
        ("M80.08XA", "vertebral"),
        ("M48.56XA", "vertebral"),
        ("S32.010A", "vertebral"),
        ("S22.060A", "vertebral"),
        ("S72.001A", "hip"),
        ("S72.21XA", "hip"),
        ("S52.501A", "wrist"),
        ("S42.201A", "humerus"),
        ("M80.051A", "hip"),
        ("S7200XA", "hip"),
        ("J18.9", None),
        ("S72.3", None),
    ],
)
def test_icd10_fracture_codes_map_to_site(code, site):
    assert codes.fracture_site(codes.ICD10CM, code) == site


def test_icd10_lumbar_code_gives_the_vertebral_level():
    assert codes.fracture_level_from_code(codes.ICD10CM, "S32.030A") == "L3"


@pytest.mark.parametrize(
    ("system", "code", "agent"),
    [
        (codes.RXNORM, "77655", "zoledronic_acid"),
        (codes.RXNORM, "993449", "denosumab"),
        (codes.ATC, "M05BA04", "alendronate"),
        (codes.ATC, "H05AA04", "abaloparatide"),
        (codes.ATC, "G03XC01", "raloxifene"),
        (codes.ATC, "M05BX06", "romosozumab"),
        (codes.ATC, "C10AA05", None),
    ],
)
def test_agent_codes_map_to_agents(system, code, agent):
    assert codes.agent_for_code(system, code) == agent


def test_agent_is_found_by_ingredient_name_in_product_text():
    assert codes.agent_for_text("Zoledronic Acid 5 MG/100ML Injection") == "zoledronic_acid"
    assert codes.agent_for_text("Prolia (denosumab) 60 mg") == "denosumab"
    assert codes.agent_for_text("atorvastatin 20 mg") is None


def test_long_acting_agents_cover_their_dosing_interval():
    assert codes.dose_interval_days("zoledronic_acid", "iv") == 365
    assert codes.dose_interval_days("denosumab", "sc") == 183
    assert codes.dose_interval_days("ibandronate", "iv") == 91
    assert codes.dose_interval_days("ibandronate", "oral") == 0
    assert codes.dose_interval_days("alendronate", "oral") == 0
