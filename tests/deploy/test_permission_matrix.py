"""Every URL pattern x every role behaves as tests/deploy/url_policy.py says.

One test walks the whole resolver (so a new URL is covered the moment it is mounted) and
collects every violation, then fails once with the full list: that is far cheaper than a
parametrized test per (URL, role) on 2 CPU cores, and the message names each offender.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from registry.feeds import feed_create
from registry.models import Alert, AuditAction, AuditEvent, WorkerProbe
from scoring.models import ImagingSeries, ImagingStudy, VbqResult
from tests.deploy import url_policy
from tests.factories import FractureFactory, PatientFactory, ProcedureFactory

ROUTE_PARAM = re.compile(r"<(?:(?P<conv>\w+):)?(?P<name>\w+)>")
REGEX_GROUP = re.compile(r"\(\?P<(?P<name>\w+)>(?P<body>[^()]*(?:\([^()]*\)[^()]*)*)\)")
DENIED = {401, 403, 404}


@dataclass(frozen=True)
class Endpoint:
    key: str  # URL name with namespace, or the route string when unnamed
    route: str


def iter_endpoints(resolver: URLResolver | None = None, prefix: str = "", ns: str = ""):
    """Every URLPattern under ``resolver``, with its full route and qualified name."""
    resolver = resolver or get_resolver()
    for pattern in resolver.url_patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            sub_ns = ns + (f"{pattern.namespace}:" if pattern.namespace else "")
            yield from iter_endpoints(pattern, route, sub_ns)
        elif isinstance(pattern, URLPattern):
            yield Endpoint(key=ns + pattern.name if pattern.name else route, route=route)


def policy_for(endpoint: Endpoint) -> url_policy.Rule | None:
    if endpoint.key in url_policy.URL_POLICY:
        return url_policy.URL_POLICY[endpoint.key]
    if endpoint.route in url_policy.URL_POLICY:
        return url_policy.URL_POLICY[endpoint.route]
    for prefix, rule in url_policy.PREFIX_POLICIES.items():
        if endpoint.route.lstrip("^").startswith(prefix):
            return rule
    return None


def sample_value(name: str, converter: str, ns: SimpleNamespace, body: str = "") -> str:
    if name in url_policy.SAMPLE_KWARGS:
        return str(url_policy.SAMPLE_KWARGS[name](ns))  # type: ignore[operator]
    if body and re.fullmatch(r"[\w|]+", body):  # an alternation of literals: take the first
        return body.split("|")[0]
    return {"int": "1", "uuid": str(ns.patient.pk), "path": "1"}.get(converter, "x")


def build_path(route: str, ns: SimpleNamespace) -> str:
    """A concrete path for a route (``<conv:name>`` and ``(?P<name>...)`` filled in)."""
    # Regex groups first: their ``(?P<name>...)`` would otherwise look like ``<name>``.
    path = REGEX_GROUP.sub(lambda m: sample_value(m["name"], "str", ns, m["body"]), route)
    path = ROUTE_PARAM.sub(lambda m: sample_value(m["name"], m["conv"] or "str", ns), path)
    path = path.replace("^", "").replace("$", "").replace("\\", "")
    return "/" + path


@pytest.fixture
def fixture_ns(db, role_user) -> SimpleNamespace:
    patient = PatientFactory(given_name="Matrixgiven", mrn="SYN-MATRIX01")
    procedure = ProcedureFactory(patient=patient)
    fracture = FractureFactory(patient=patient)
    alert = Alert.objects.create(
        patient=patient, rule_id="high-vbq-untreated-60d", reason="fixture",
        opened_at=timezone.now(), care_team=patient.care_team,
    )
    study = ImagingStudy.objects.create(
        patient=patient, study_instance_uid=f"2.25.{uuid.uuid4().int}", source="fhir",
    )
    series = ImagingSeries.objects.create(
        study=study, series_instance_uid=f"2.25.{uuid.uuid4().int}"
    )
    vbq_result = VbqResult.objects.create(
        series=series, patient=patient, algorithm_version="fixture", source="auto"
    )
    feed, token = feed_create(name="matrix-feed")
    users = {role: role_user(role) for role in url_policy.ROLES if role != url_policy.ANONYMOUS}
    return SimpleNamespace(
        patient=patient, procedure=procedure, fracture=fracture, therapy=None, alert=alert,
        study=study, series=series, vbq_result=vbq_result, probe=WorkerProbe.objects.create(),
        feed=feed, feed_token=token, users=users,
    )


def client_for(role: str, ns: SimpleNamespace) -> Client:
    client = Client(raise_request_exception=False)
    if role == url_policy.ANONYMOUS:
        return client
    client.force_login(ns.users[role])
    if role == url_policy.FEED:
        client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {ns.feed_token}"
    return client


def redirects_to_login(response) -> bool:
    """A redirect to a login page asking to come back (``?next=``): access denied.

    (A plain redirect to the login page, e.g. after logging out, is not a denial.)
    """
    if response.status_code not in {301, 302, 303}:
        return False
    location = urlparse(response.headers.get("Location", ""))
    return "/login" in location.path and "next=" in location.query


def _patient_reads(ns: SimpleNamespace) -> int:
    return AuditEvent.objects.filter(patient_id=ns.patient.pk, action=AuditAction.READ).count()


def test_every_url_pattern_is_classified_in_url_policy(db):
    unclassified = sorted(
        {f"{e.key!r} (route {e.route!r})" for e in iter_endpoints() if policy_for(e) is None}
    )
    assert not unclassified, (
        "These URLs have no access policy. Add each to URL_POLICY in "
        "tests/deploy/url_policy.py (who may use it, is it patient-identifying, which "
        "methods):\n  " + "\n  ".join(unclassified)
    )


def test_url_policy_names_no_url_that_no_longer_exists(db):
    keys = {e.key for e in iter_endpoints()} | {e.route for e in iter_endpoints()}
    stale = sorted(set(url_policy.URL_POLICY) - keys)
    assert not stale, f"url_policy.py classifies URLs that are not mounted: {stale}"


@pytest.mark.postgres
def test_every_url_answers_every_role_as_the_policy_says(fixture_ns):
    ns = fixture_ns
    clients = {role: client_for(role, ns) for role in url_policy.ROLES}
    phi_markers = ("Matrixgiven", "SYN-MATRIX01")
    violations: list[str] = []
    checked = 0
    for endpoint in iter_endpoints():
        rule = policy_for(endpoint)
        if rule is None:
            continue  # reported by test_every_url_pattern_is_classified_in_url_policy
        path = build_path(endpoint.route, ns)
        for role in url_policy.ROLES:
            for method in rule.methods:
                reads_before = _patient_reads(ns)
                response = getattr(clients[role], method.lower())(path)
                checked += 1
                status = response.status_code
                where = f"{method} {path} [{endpoint.key}] as {role}: {status}"
                if status >= 500:
                    violations.append(f"{where} (server error)")
                    continue
                denied = status in DENIED or redirects_to_login(response)
                allowed = role in rule.allowed and (
                    role != url_policy.ANONYMOUS or rule.public
                )
                if allowed and denied and status != 404:
                    violations.append(f"{where} (expected access)")
                if not allowed and not denied:
                    violations.append(f"{where} (expected denial)")
                may_see_phi = role in url_policy.PHI_ROLES or (
                    rule.identifying and role in rule.allowed
                )
                if (
                    not may_see_phi
                    and status == 200
                    and not getattr(response, "streaming", False)
                    and any(m.encode() in response.content for m in phi_markers)
                ):
                    violations.append(f"{where} (patient name/MRN in the body)")
                if (
                    rule.identifying
                    and method == "GET"
                    and status == 200
                    and str(ns.patient.pk) in path
                ):
                    audited = _patient_reads(ns) > reads_before
                    known_gap = endpoint.key in url_policy.KNOWN_UNAUDITED_READS
                    if not audited and not known_gap:
                        violations.append(f"{where} (patient data read without an AuditEvent)")
                    if audited and known_gap:
                        violations.append(f"{where} (audited now: remove it from "
                                          "KNOWN_UNAUDITED_READS in url_policy.py)")
                if rule.identifying and role == url_policy.QI_ANALYST and status == 200:
                    violations.append(f"{where} (qi_analyst on an identifying URL)")
            # A POST may change state (e.g. acknowledge): log the feed user back in etc.
            if role != url_policy.ANONYMOUS and "POST" in rule.methods:
                clients[role] = client_for(role, ns)
    assert checked > 0
    assert not violations, f"{len(violations)} of {checked} requests broke the policy:\n  " + (
        "\n  ".join(violations)
    )


def test_qi_analyst_role_lacks_identified_data_permission(db, role_user):
    from registry.roles import ensure_roles

    ensure_roles()
    user = role_user(url_policy.QI_ANALYST)
    assert not user.has_perm("registry.view_identified_data")
    assert Group.objects.filter(name=url_policy.QI_ANALYST).exists()


def test_sample_paths_resolve_to_their_own_pattern(fixture_ns):
    """The matrix requests the URL it means to (a broken sample path would just 404)."""
    from django.urls import Resolver404, resolve

    wrong = []
    for endpoint in iter_endpoints():
        if endpoint.route.endswith("(?P<url>.*)$"):
            continue  # the admin catch-all matches anything
        path = build_path(endpoint.route, fixture_ns)
        try:
            match = resolve(path)
        except Resolver404:
            wrong.append(f"{endpoint.key}: {path} does not resolve")
            continue
        if match.route != endpoint.route.replace("^", "", 1) and match.view_name != endpoint.key:
            wrong.append(f"{endpoint.key}: {path} resolves to {match.view_name}")
    assert not wrong, "\n".join(wrong)
