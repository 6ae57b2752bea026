"""Code sets as data, in one place. Pure module (no Django).

Sources (verify against your local terminology release before go-live):
- CPT 22510–22515: AMA CPT 2015+, "Percutaneous vertebral augmentation" family
  (22510–22512 vertebroplasty, 22513–22515 kyphoplasty).
- SNOMED CT International: 392010000 |Percutaneous vertebroplasty|, 429616001
  |Percutaneous kyphoplasty|, 447766008 |Vertebral augmentation| (parent; kind unknown),
  207938004 |Compression fracture of vertebra|.
- ICD-10-CM (CDC/CMS FY2025 tabular): M80.0-/M80.8- age-related / other osteoporosis with
  current pathological fracture (6th character gives the site), M48.5- collapsed vertebra NEC,
  S22.0- thoracic vertebra, S32.0- lumbar vertebra, S32.1-/S32.3-/S32.4-/S32.5- pelvis,
  S72.0-–S72.2- femoral neck / pertrochanteric / subtrochanteric, S52.5- distal radius,
  S42.2- proximal humerus, S22.3-/S22.4- rib(s).
- WHO ATC/DDD Index 2025: M05BA bisphosphonates, M05BB bisphosphonate combinations, M05BX04
  denosumab, M05BX06 romosozumab, H05AA02 teriparatide, H05AA04 abaloparatide, G03XC01
  raloxifene.
- RxNorm (NLM RxNav) ingredient RxCUIs. Feeds usually send product-level codes (SCD/SBD), so
  agents are also matched by ingredient name in the coding display / text.
- Dosing intervals: product labels (Reclast/Aclasta yearly IV; Prolia every 6 months; Boniva
  IV every 3 months) and DESIGN.md "Clinical definitions".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

CPT = "http://www.ama-assn.org/go/cpt"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"

VERTEBROPLASTY = "vertebroplasty"
KYPHOPLASTY = "kyphoplasty"

# (system, code) -> procedure kind
PROCEDURE_CODES: dict[tuple[str, str], str] = {
    (CPT, "22510"): VERTEBROPLASTY,  # cervicothoracic
    (CPT, "22511"): VERTEBROPLASTY,  # lumbosacral
    (CPT, "22512"): VERTEBROPLASTY,  # each additional body
    (CPT, "22513"): KYPHOPLASTY,  # thoracic
    (CPT, "22514"): KYPHOPLASTY,  # lumbar
    (CPT, "22515"): KYPHOPLASTY,  # each additional body
    (SNOMED, "392010000"): VERTEBROPLASTY,
    (SNOMED, "429616001"): KYPHOPLASTY,
    # Vertebral augmentation, kind not stated: counted as vertebroplasty-family procedure.
    (SNOMED, "447766008"): VERTEBROPLASTY,
}


def procedure_kind(system: str, code: str) -> str | None:
    """Return ``vertebroplasty`` / ``kyphoplasty`` for a qualifying code, else ``None``."""
    return PROCEDURE_CODES.get((system, code.strip()))


# ICD-10-CM prefix -> fracture site. Longest prefix wins. The M80 6th character encodes the site.
_ICD10_FRACTURE_PREFIXES: dict[str, str] = {
    "M48.5": "vertebral",
    "M80.08": "vertebral",
    "M80.88": "vertebral",
    "M80.05": "hip",
    "M80.85": "hip",
    "M80.03": "wrist",
    "M80.83": "wrist",
    "M80.02": "humerus",
    "M80.82": "humerus",
    "M80.0": "other",
    "M80.8": "other",
    "S22.0": "vertebral",
    "S32.0": "vertebral",
    "S32.1": "pelvis",
    "S32.3": "pelvis",
    "S32.4": "pelvis",
    "S32.5": "pelvis",
    "S32.8": "pelvis",
    "S72.0": "hip",
    "S72.1": "hip",
    "S72.2": "hip",
    "S52.5": "wrist",
    "S42.2": "humerus",
    "S22.3": "rib",
    "S22.4": "rib",
}

# SNOMED CT fracture disorders -> site (a small, explicit set; extend per site).
_SNOMED_FRACTURES: dict[str, str] = {
    "207938004": "vertebral",  # Compression fracture of vertebra
    "42188001": "vertebral",  # Osteoporotic fracture of vertebra (pathological)
    "5913000": "hip",  # Fracture of neck of femur
    "263225007": "hip",  # Fracture of proximal end of femur
    "263102004": "wrist",  # Fracture of distal end of radius
    "263184009": "humerus",  # Fracture of proximal end of humerus
    "33173003": "rib",  # Fracture of rib
    "7346004": "pelvis",  # Fracture of pelvis
}

# ICD-10-CM (FY2025 tabular, S22.0- "Fracture of thoracic vertebra", S32.0- "Fracture of lumbar
# vertebra"): the 5th character names the vertebra, the 6th the fracture type (0 wedge
# compression, 1 stable burst, 2 unstable burst, 8 other, 9 unspecified fracture OF THAT
# vertebra), the 7th the encounter (A/B initial, D/G/K subsequent, S sequela). Neither the 6th
# nor the 7th changes the level. S22.00- / S32.00- ("unspecified thoracic / lumbar vertebra")
# name no level. S22.05–S22.08 name a PAIR of vertebrae: the code alone gives only the set of
# possible levels (see ``resolve_fracture_level``). Table documented in docs/reports.md.
_ICD10_LEVELS: dict[str, tuple[str, ...]] = {
    "S22.01": ("T1",), "S22.02": ("T2",), "S22.03": ("T3",), "S22.04": ("T4",),
    "S22.05": ("T5", "T6"), "S22.06": ("T7", "T8"), "S22.07": ("T9", "T10"),
    "S22.08": ("T11", "T12"),
    "S32.01": ("L1",), "S32.02": ("L2",), "S32.03": ("L3",), "S32.04": ("L4",),
    "S32.05": ("L5",),
}  # fmt: skip


def _icd10_dotted(code: str) -> str:
    code = code.strip().upper()
    if "." not in code and len(code) > 3:
        code = code[:3] + "." + code[3:]
    return code


def fracture_site(system: str, code: str) -> str | None:
    """Return the fracture site for a fragility-fracture code, or ``None`` if not one."""
    code = _icd10_dotted(code) if system == ICD10CM else code.strip()
    if system == SNOMED:
        return _SNOMED_FRACTURES.get(code)
    if system != ICD10CM:
        return None
    for length in range(len(code), 2, -1):
        site = _ICD10_FRACTURE_PREFIXES.get(code[:length])
        if site:
            return site
    return None


def fracture_levels_from_code(system: str, code: str) -> tuple[str, ...]:
    """The vertebral levels an ICD-10-CM code allows: one level (S22.01–S22.04, S32.01–S32.05),
    a pair (S22.05–S22.08, e.g. ``("T11", "T12")``), or ``()`` when the code names no level."""
    if system != ICD10CM:
        return ()
    return _ICD10_LEVELS.get(_icd10_dotted(code)[:6], ())


def fracture_level_from_code(system: str, code: str) -> str | None:
    """The single vertebral level an ICD-10-CM code names, or ``None`` (no level, or a pair
    of vertebrae such as S22.08 T11–T12, which names no single level)."""
    levels = fracture_levels_from_code(system, code)
    return levels[0] if len(levels) == 1 else None


def resolve_fracture_level(system: str, code: str, body_site_levels: Sequence[str],
                           other_text_levels: Sequence[str] = ()) -> str:
    """The one vertebral level to record for a vertebral fracture, or ``""`` when unknown.

    - The code names one level: that level (a body site naming another level does not
      override the classification).
    - The code names a pair (S22.05–S22.08): the body site's level when it names exactly one
      level of the pair; otherwise ``""`` (the level is not known, only that it is one of two).
    - The code names no level (M80.08-, M48.5-, S22.00-, SNOMED CT): the first level in the
      body site, else in ``other_text_levels`` (e.g. the coding's display text), else ``""``.
    """
    allowed = fracture_levels_from_code(system, code)
    if len(allowed) == 1:
        return allowed[0]
    if allowed:
        inside = [lv for lv in dict.fromkeys(body_site_levels) if lv in allowed]
        return inside[0] if len(inside) == 1 else ""
    return next(iter([*body_site_levels, *other_text_levels]), "")


@dataclass(frozen=True)
class Agent:
    """An anti-osteoporosis agent and how long one dose keeps a patient 'on therapy'."""

    key: str
    display: str
    rxnorm_ingredient: str | None
    atc_codes: tuple[str, ...]
    # Days a single administration covers when the record has no end date. 0 = continuous
    # (daily/weekly/monthly oral or daily injection): exposure counts only while active.
    dose_interval_days: dict[str, int]


AGENTS: dict[str, Agent] = {
    a.key: a
    for a in (
        Agent("alendronate", "Alendronate", "46041", ("M05BA04", "M05BB03"), {"oral": 0}),
        Agent("risedronate", "Risedronate", "73056", ("M05BA07", "M05BB02"), {"oral": 0}),
        Agent(
            "ibandronate", "Ibandronate", "115264", ("M05BA06",), {"oral": 0, "iv": 91}
        ),
        Agent("zoledronic_acid", "Zoledronic acid", "77655", ("M05BA08",), {"iv": 365}),
        Agent("denosumab", "Denosumab", "993449", ("M05BX04",), {"sc": 183}),
        Agent("teriparatide", "Teriparatide", "110634", ("H05AA02",), {"sc": 0}),
        # RxCUIs for abaloparatide and romosozumab are matched by name/ATC until verified.
        Agent("abaloparatide", "Abaloparatide", None, ("H05AA04",), {"sc": 0}),
        Agent("romosozumab", "Romosozumab", None, ("M05BX06",), {"sc": 30}),
        Agent("raloxifene", "Raloxifene", "72143", ("G03XC01",), {"oral": 0}),
    )
}

_ATC_PREFIX_AGENT = {"M05BA": None, "M05BB": None}  # class codes: agent from the 7-char code
_NAME_PATTERNS = {
    key: re.compile(r"\b" + agent.display.split()[0].lower()[:8], re.IGNORECASE)
    for key, agent in AGENTS.items()
}


def agent_for_code(system: str, code: str) -> str | None:
    """Map an RxNorm ingredient or ATC code to an agent key, or ``None``."""
    code = code.strip()
    for agent in AGENTS.values():
        if system == RXNORM and agent.rxnorm_ingredient == code:
            return agent.key
        if system == ATC and code.upper() in agent.atc_codes:
            return agent.key
    return None


def agent_for_text(text: str) -> str | None:
    """Find an agent by ingredient name in free text (coding display, Medication.code.text)."""
    for key, pattern in _NAME_PATTERNS.items():
        if pattern.search(text or ""):
            return key
    return None


def dose_interval_days(agent_key: str, route: str) -> int:
    """Days one dose covers for ``agent_key`` by ``route`` (0 when continuous dosing)."""
    agent = AGENTS[agent_key]
    if route in agent.dose_interval_days:
        return agent.dose_interval_days[route]
    return max(agent.dose_interval_days.values()) if len(agent.dose_interval_days) == 1 else 0


def is_atc_osteoporosis_class(code: str) -> bool:
    """True for an ATC code in the bisphosphonate classes (M05BA, M05BB) used as a class code."""
    return code.strip().upper()[:5] in _ATC_PREFIX_AGENT
