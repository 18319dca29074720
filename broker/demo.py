"""The demo: embedded SQLite, built-in synthetic FHIR data, a dev client, seeded team.

Besides the static FHIR source, four SQL sources (child welfare, probation, juvenile court,
school district) read synthetic agency databases that ``seed`` builds as SQLite files under
``<state dir>/sources``. Everything here is synthetic. The demo state (keys, databases) lives
under ``var/mdt-broker-demo`` and the settings refuse that key outside demo mode.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select

from broker.settings import DEMO_STATE_DIR_NAME, REPO_POLICY_DIR, Settings, SourceConfig
from broker.store.db import make_engine, make_sessionmaker, upgrade
from broker.store.models import Agency, Mdt, MembershipRow, OAuthClient, Staff, Youth, YouthIdentifier
from connectors import synthetic

DEMO_DATA = Path(__file__).resolve().parent.parent / "connectors" / "demo_data" / "fhir"
EHR_SYSTEM = "urn:mdt-broker:demo:county-ehr"
EHR_TYPES = ["Patient", "Observation", "Condition", "DocumentReference", "MedicationRequest", "Immunization",
             "Encounter"]


@dataclass(frozen=True)
class DemoPerson:
    """A seeded staff member of a seeded agency system."""

    alias: str
    sub: str
    agency: str
    role: str
    client_id: str
    statutory: bool
    on_team: bool


AGENCIES = {
    "demo-child-welfare": ("Demo County Child Welfare Services", ["child-welfare-worker"]),
    "demo-probation": ("Demo County Probation", ["probation-officer"]),
    "demo-behavioral-health": ("Demo County Behavioral Health",
                               ["mental-health-clinician", "substance-use-counselor"]),
    "demo-public-health": ("Demo County Public Health", ["public-health-nurse"]),
    "demo-district-attorney": ("Demo County District Attorney", ["district-attorney"]),
    "demo-sheriff": ("Demo County Sheriff", ["law-enforcement"]),
}

PEOPLE = (
    DemoPerson("cw", "staff-cw-0001", "demo-child-welfare", "child-welfare-worker", "demo-cw-system", True, True),
    DemoPerson("po", "staff-po-0001", "demo-probation", "probation-officer", "demo-probation-system", True, True),
    DemoPerson("mh", "staff-mh-0001", "demo-behavioral-health", "mental-health-clinician", "demo-bh-system",
               True, True),
    DemoPerson("sud", "staff-sud-0001", "demo-behavioral-health", "substance-use-counselor", "demo-bh-system",
               True, True),
    DemoPerson("phn", "staff-phn-0001", "demo-public-health", "public-health-nurse", "demo-phn-system",
               False, True),
    DemoPerson("da", "staff-da-0001", "demo-district-attorney", "district-attorney", "demo-da-system",
               False, False),
    DemoPerson("le", "staff-le-0001", "demo-sheriff", "law-enforcement", "demo-sheriff-system", False, False),
    DemoPerson("admin", "staff-admin-0001", "demo-child-welfare", "registry-admin", "demo-cw-system",
               False, False),
)
YOUTH = {"y-demo-alpha": "pt-alpha", "y-demo-bravo": "pt-bravo", "y-demo-charlie": "pt-charlie"}
# The same youth in the synthetic agency databases (connectors/synthetic): source -> source id.
# Charlie stays the youth whose only records are protected (the banner shows that), so no links.
SQL_LINKS = {"y-demo-alpha": synthetic.TEST_YOUTH["y-alpha"], "y-demo-bravo": synthetic.TEST_YOUTH["y-bravo"]}
MDTS = {"mdt-demo-alpha": "y-demo-alpha", "mdt-demo-bravo": "y-demo-bravo", "mdt-demo-charlie": "y-demo-charlie"}


def state_dir(root: Path | None = None) -> Path:
    """Where the demo keeps its keys and database."""
    base = root or Path(os.environ.get("BROKER_DEMO_ROOT", Path.cwd() / "var"))
    return base / DEMO_STATE_DIR_NAME


def ensure_keys(directory: Path) -> None:
    """Create the broker key and one key per dev client, once."""
    from broker.auth.keys import generate_private_key_pem

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    from broker.audit.checkpoint import generate_audit_key_pem

    names = ["broker"] + sorted({p.client_id for p in PEOPLE})
    for name in names:
        path = directory / f"{name}.pem"
        if not path.exists():
            path.write_bytes(generate_private_key_pem("EC"))
            os.chmod(path, 0o600)
    audit_key = directory / "audit-ed25519.pem"
    if not audit_key.exists():
        audit_key.write_bytes(generate_audit_key_pem())
        os.chmod(audit_key, 0o600)


def source_databases(directory: Path) -> dict[str, str]:
    """The SQLite URLs of the demo's synthetic agency databases (built by ``seed``)."""
    return synthetic.sqlite_urls(directory / "sources")


def demo_settings(directory: Path, *, host: str = "127.0.0.1", port: int = 8000) -> Settings:
    """Demo-mode settings pointing at the built-in synthetic sources."""
    return Settings(
        mode="demo",
        database_url=f"sqlite:///{directory / 'broker.sqlite'}",
        public_url=f"http://{host}:{port}",
        issuer=f"http://{host}:{port}",
        signing_key_file=directory / "broker.pem",
        audit_key_file=directory / "audit-ed25519.pem",
        policy_dir=REPO_POLICY_DIR,
        sources=[SourceConfig(name="county-ehr", kind="static-fhir", data_dir=DEMO_DATA,
                              identifier_system=EHR_SYSTEM, default_categories=["general-health"],
                              resource_types=EHR_TYPES, timeout=5),
                 *synthetic.source_configs(source_databases(directory), timeout=5)],
    )


def client_public_jwks(pem_path: Path) -> dict:
    """The public JWK Set registered for a dev client."""
    from broker.auth.keys import load_signing_key

    return load_signing_key(pem_path).public_jwks()


def seed(settings: Settings, keys: Path) -> None:
    """Create the schema, the source databases and the synthetic agencies, staff, clients, youth, teams; idempotent."""
    synthetic.build({s.name: s.database_url for s in settings.sources if s.kind == "sql" and s.database_url})
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    now = datetime.now(timezone.utc)
    with sessions() as s:
        if s.get(Agency, "demo-child-welfare") is not None:
            _link_sql_sources(s, settings)  # a demo seeded before the SQL sources existed gets them too
            s.commit()
            engine.dispose()
            return
        for agency_id, (name, roles) in AGENCIES.items():
            roles = roles + (["registry-admin"] if agency_id == "demo-child-welfare" else [])
            s.add(Agency(id=agency_id, name=name, roles=roles))
        s.flush()
        for client_id in sorted({p.client_id for p in PEOPLE}):
            agency = next(p.agency for p in PEOPLE if p.client_id == client_id)
            s.add(OAuthClient(client_id=client_id, agency_id=agency, name=f"{client_id} (demo)",
                              jwks=client_public_jwks(keys / f"{client_id}.pem"), active=True, created_at=now))
        for p in PEOPLE:
            s.add(Staff(sub=p.sub, agency_id=p.agency, roles=[p.role], active=True))
        for youth_id, patient in YOUTH.items():
            s.add(Youth(id=youth_id, birth_date=None, created_at=now, created_by="demo-seed"))
            s.flush()
            s.add(YouthIdentifier(youth_id=youth_id, source="county-ehr", system=EHR_SYSTEM, value=patient))
        _link_sql_sources(s, settings)
        for mdt_id, youth_id in MDTS.items():
            s.add(Mdt(id=mdt_id, youth_id=youth_id, lead_agency_id="demo-child-welfare", opened_at=now,
                      closed_at=None, created_by="demo-seed"))
            s.flush()
            for p in PEOPLE:
                if p.on_team:
                    s.add(MembershipRow(id=f"m-{uuid.uuid4().hex}", mdt_id=mdt_id, agency_id=p.agency, sub=p.sub,
                                        team_role=p.role, statutory=p.statutory,
                                        valid_from=now - timedelta(days=30), valid_to=None, added_by="demo-seed"))
        s.commit()
    engine.dispose()


def _link_sql_sources(session, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """Link each demo youth to its id in every configured synthetic SQL source, once."""
    configured = {c.name: c.identifier_system for c in settings.sources if c.kind == "sql"}
    for youth_id, ids in SQL_LINKS.items():
        for source, value in ids.items():
            system = configured.get(source)
            if system is None:
                continue
            exists = session.scalar(select(YouthIdentifier.id).where(YouthIdentifier.system == system,
                                                                     YouthIdentifier.value == value))
            if exists is None:
                session.add(YouthIdentifier(youth_id=youth_id, source=source, system=system, value=value))
    session.flush()


def person(alias: str) -> DemoPerson:
    """Look up a seeded person by alias (cw, po, mh, sud, phn, da, le, admin)."""
    for p in PEOPLE:
        if p.alias == alias:
            return p
    raise KeyError(alias)


def client_assertion(keys: Path, client_id: str, token_endpoint: str) -> str:
    """A fresh RFC 7523 client assertion signed with the dev client's key."""
    from joserfc import jwt

    from broker.auth.keys import load_signing_key

    key = load_signing_key(keys / f"{client_id}.pem")
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_endpoint, "iat": now, "exp": now + 120,
              "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": key.alg, "kid": key.kid}, claims, key.jwk, algorithms=[key.alg])


def request_token(settings: Settings, keys: Path, p: DemoPerson, purpose: str | None = None) -> str:
    """Ask the running demo's token endpoint, authenticating as the person's dev client (RFC 7523)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    form = {"grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": client_assertion(keys, p.client_id, settings.token_endpoint),
            "staff_sub": p.sub, "staff_role": p.role}
    if purpose:
        form["purpose_of_use"] = purpose
    request = urllib.request.Request(settings.token_endpoint, data=urllib.parse.urlencode(form).encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["access_token"]
    except urllib.error.HTTPError as err:
        raise OSError(f"token endpoint answered {err.code}") from None


def mint_token(settings: Settings, alias: str, purpose: str | None = None) -> str:
    """A broker access token for a seeded person, issued in-process by the dev issuer."""
    from broker.auth.keys import load_signing_key
    from broker.auth.tokens import TokenIssuer

    p = person(alias)
    issuer = TokenIssuer(settings, load_signing_key(settings.signing_key_file))
    token, _ = issuer.issue(sub=p.sub, agency=p.agency, role=p.role, client_id=p.client_id,
                            scopes=frozenset({"records.read"}), purpose=purpose, now=datetime.now(timezone.utc))
    return token


def banner(settings: Settings) -> str:
    """What the demo prints: the URL and requests that show an allowed and a withheld category."""
    url = settings.public_url
    po = mint_token(settings, "po")
    mh = mint_token(settings, "mh")
    lines = [
        "",
        f"mdt-broker demo running at {url}  (API docs: {url}/docs)",
        "All data is synthetic. Tokens below are valid for 10 minutes; get more through the dev clients with",
        f"  .venv/bin/broker token --port {settings.public_url.rsplit(':', 1)[1]} --as po|cw|mh|sud|phn|da|le|admin",
        "",
        "# A probation officer on the team, care coordination: mental health is released (W&IC 5328.04),",
        "# substance use (42 CFR Part 2), HIV and psychotherapy notes are withheld without a trace:",
        f"curl -s -H 'Authorization: Bearer {po}' -H 'X-Purpose-Of-Use: COC' \\",
        f"  {url}/mdts/mdt-demo-alpha/fhir/Condition | python3 -m json.tool",
        "",
        "# The treating clinician, treatment: more categories are released:",
        f"curl -s -H 'Authorization: Bearer {mh}' -H 'X-Purpose-Of-Use: TREAT' \\",
        f"  {url}/mdts/mdt-demo-alpha/fhir/Observation | python3 -m json.tool",
        "",
        "# The whole record from every agency system, grouped by category; the mental health clinician",
        "# sees the CANRA referrals but not who made them (PC 11167(d)), and each system's status:",
        f"curl -s -H 'Authorization: Bearer {mh}' -H 'X-Purpose-Of-Use: COC' \\",
        f"  {url}/mdts/mdt-demo-alpha/record | python3 -m json.tool",
        "",
        "# A youth whose only records are protected looks exactly like a youth with none:",
        f"curl -s -H 'Authorization: Bearer {po}' -H 'X-Purpose-Of-Use: COC' \\",
        f"  {url}/mdts/mdt-demo-charlie/fhir/Observation | python3 -m json.tool",
        "",
        "# Verify the audit chain:  .venv/bin/broker audit verify --demo",
        "",
    ]
    return "\n".join(lines)


def print_json(obj: object) -> None:
    """Pretty JSON to stdout."""
    print(json.dumps(obj, indent=2))


def existing_mdts(settings: Settings) -> list[str]:
    """MDT ids in the demo database (for the banner and smoke tests)."""
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as s:
            return list(s.scalars(select(Mdt.id)))
    finally:
        engine.dispose()
