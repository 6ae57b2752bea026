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


@pytest.mark.parametrize(
    ("code", "levels"),
    [
        # ICD-10-CM FY2025 tabular, S22.0- / S32.0-: the 5th character names the vertebra;
        # the 6th (fracture type, 9 = unspecified fracture of that vertebra) and the 7th
        # (encounter) do not change it.
        ("S22.010A", ("T1",)), ("S22.019A", ("T1",)), ("S22.020A", ("T2",)),
        ("S22.031D", ("T3",)), ("S22.042A", ("T4",)), ("S22.050A", ("T5", "T6")),
        ("S22.060A", ("T7", "T8")), ("S22.078G", ("T9", "T10")), ("S22.080A", ("T11", "T12")),
        ("S22089S", ("T11", "T12")), ("S32.010A", ("L1",)), ("S32.020A", ("L2",)),
        ("S32.039A", ("L3",)), ("S32.040K", ("L4",)), ("S32.050A", ("L5",)),
        # "unspecified thoracic / lumbar vertebra", osteoporotic and collapsed vertebra codes:
        # no level in the code.
        ("S22.009A", ()), ("S32.000A", ()), ("M80.08XA", ()), ("M48.56XA", ()),
    ],
)
def test_icd10_vertebral_codes_give_the_levels_the_classification_names(code, levels):
    assert codes.fracture_levels_from_code(codes.ICD10CM, code) == levels


def test_a_code_for_a_pair_of_vertebrae_names_no_single_level():
    assert codes.fracture_level_from_code(codes.ICD10CM, "S22.080A") is None
    assert codes.fracture_level_from_code(codes.ICD10CM, "S22.020A") == "T2"


@pytest.mark.parametrize(
    ("code", "body_site", "level"),
    [
        ("S22.080A", ["T12"], "T12"),  # the body site picks one of the pair
        ("S22.080A", [], ""),  # pair without a body site: level unknown
        ("S22.080A", ["L1"], ""),  # body site outside the pair: inconsistent, unknown
        ("S22.080A", ["T11", "T12"], ""),  # both of the pair: no single level
        ("S22.060A", ["T7"], "T7"),
        ("S22.020A", ["T3"], "T2"),  # a single-level code is not overridden
        ("M80.08XA", ["T9"], "T9"),  # no level in the code: the body site's
    ],
)
def test_the_recorded_level_comes_from_the_body_site_only_within_the_code(
    code, body_site, level
):
    assert codes.resolve_fracture_level(codes.ICD10CM, code, body_site) == level
