"""A SYNTHETIC demo cohort shaped like Kadri et al. 2025 (no real person, ever).

``generate_demo_cohort`` is pure (seeded, no Django): it returns plain dataclasses that a loader
writes to the registry (``registry.management.commands.demo_cohort``) or that the FHIR layer
turns into bundles. The shape follows the paper: mean age 73.7 ± 10.1 years, 57 % female,
one patient in three with a secondary fracture, 85 % of those with VBQ ≥ 3.0, 80 % of fractures
more than 60 days after the procedure.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field

SYNTHETIC_MRN_SYSTEM = "https://vbq-registry.example.org/fhir/sid/synthetic-mrn"
SYNTHETIC_SOURCE_SYSTEM = "https://vbq-registry.example.org/fhir/sid/synthetic-ehr"

_AGENTS = [
    ("alendronate", "oral", "order"),
    ("zoledronic_acid", "iv", "administration"),
    ("denosumab", "sc", "administration"),
    ("risedronate", "oral", "dispense"),
    ("teriparatide", "sc", "order"),
]
_OTHER_SITES = ["hip", "wrist", "humerus", "pelvis", "rib"]
_LEVELS = ["T11", "T12", "L1", "L2", "L3", "L4"]


@dataclass
class DemoFracture:
    key: str
    site: str
    level: str
    day_offset: int  # days after the index procedure


@dataclass
class DemoTherapy:
    key: str
    agent: str
    route: str
    kind: str
    day_offset: int


@dataclass
class DemoPatient:
    key: str  # e.g. SYN-000017, also the synthetic MRN
    given_name: str
    family_name: str
    sex: str
    birth_date: dt.date
    index_date: dt.date
    procedure_kind: str
    procedure_code: str
    index_level: str
    vbq_all_levels: float
    vbq_excluding_fractured: float
    field_strength_t: float
    mri_day_offset: int  # negative: days before the procedure
    bmi: float
    last_contact: dt.date
    deceased_on: dt.date | None
    fractures: list[DemoFracture] = field(default_factory=list)
    therapies: list[DemoTherapy] = field(default_factory=list)


def generate_demo_cohort(
    n: int = 60, *, seed: int = 2025, today: dt.date, recent: int | None = None
) -> list[DemoPatient]:
    """Return ``n`` synthetic patients. ``recent`` of them (default n // 7) had their procedure
    40–120 days before ``today`` so the follow-up worklist has live cases."""
    if n < 1:
        raise ValueError("n must be at least 1")
    rng = random.Random(seed)
    recent = n // 7 if recent is None else recent
    n_fractured = round(n / 3)
    n_fractured_high = round(0.85 * n_fractured)
    n_late = round(0.8 * n_fractured)
    n_female = round(0.57 * n)
    older = list(range(n - recent))
    rng.shuffle(older)
    fractured = set(older[:n_fractured])
    fractured_order = older[:n_fractured]
    high_fractured = set(fractured_order[:n_fractured_high])
    late = set(rng.sample(fractured_order, n_late))
    sexes = ["female"] * n_female + ["male"] * (n - n_female)
    rng.shuffle(sexes)

    patients: list[DemoPatient] = []
    for i in range(n):
        key = f"SYN-{i + 1:06d}"
        sex = sexes[i]
        age = min(99.0, max(50.0, rng.gauss(73.7, 10.1)))
        if i >= n - recent:
            index_date = today - dt.timedelta(days=rng.randint(40, 120))
        else:
            index_date = today - dt.timedelta(days=rng.randint(400, 1500))
        birth_date = index_date - dt.timedelta(days=int(age * 365.25))
        high = i in high_fractured if i in fractured else rng.random() < 0.45
        vbq = rng.uniform(3.05, 4.6) if high else rng.uniform(1.9, 2.95)
        vbq_excl = round(vbq + rng.gauss(0.04, 0.08), 2)
        if high and vbq_excl < 3.0:
            vbq_excl = 3.0 + abs(vbq_excl - 3.0)
        if not high and vbq_excl >= 3.0:
            vbq_excl = 2.95
        proc_kind = rng.choice(["vertebroplasty", "kyphoplasty"])
        index_level = rng.choice(_LEVELS)
        lumbar = index_level.startswith("L")
        code = {
            ("vertebroplasty", False): "22510",
            ("vertebroplasty", True): "22511",
            ("kyphoplasty", False): "22513",
            ("kyphoplasty", True): "22514",
        }[(proc_kind, lumbar)]
        followup_days = (today - index_date).days
        patient = DemoPatient(
            key=key,
            given_name=f"Demo{i + 1:03d}",
            family_name="SYNTHETIC",
            sex=sex,
            birth_date=birth_date,
            index_date=index_date,
            procedure_kind=proc_kind,
            procedure_code=code,
            index_level=index_level,
            vbq_all_levels=round(vbq, 2),
            vbq_excluding_fractured=round(vbq_excl, 2),
            field_strength_t=rng.choice([1.5, 1.5, 3.0]),
            mri_day_offset=-rng.randint(1, 60),
            bmi=round(min(45.0, max(16.0, rng.gauss(24.5, 4.0))), 1),
            last_contact=today - dt.timedelta(days=rng.randint(0, 60)),
            deceased_on=None,
        )
        if i in fractured:
            if i in late:
                offset = rng.randint(61, min(900, followup_days - 1))
            else:
                offset = rng.randint(10, 60)
            site = "vertebral" if rng.random() < 0.55 else rng.choice(_OTHER_SITES)
            level = ""
            if site == "vertebral":
                level = rng.choice([lv for lv in _LEVELS if lv != index_level])
            patient.fractures.append(DemoFracture(f"{key}-FX1", site, level, offset))
        elif i < n - recent and rng.random() < 0.06:
            patient.deceased_on = index_date + dt.timedelta(days=rng.randint(200, followup_days))
            patient.last_contact = patient.deceased_on
        if i < n - recent and rng.random() < 0.35:
            agent, route, kind = rng.choice(_AGENTS)
            patient.therapies.append(
                DemoTherapy(f"{key}-RX1", agent, route, kind, rng.randint(20, 300))
            )
        # Treatment must not predate birth or postdate today; fractures must precede today.
        patient.therapies = [
            t for t in patient.therapies if index_date + dt.timedelta(t.day_offset) <= today
        ]
        patients.append(patient)
    return patients
