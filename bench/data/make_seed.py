"""Write the seed for bench/gateway.py: one invented patient with exactly 100 body weights.

    .venv/bin/python bench/data/make_seed.py      # rewrites bench/data/weights-100.json

Everything is invented and deterministic (no randomness): the same file every time. Body weight
(LOINC 29463-7, vital-signs) is general health, not a sensitive category, so a team member who
may see general health sees every one of them.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

PATIENT_ID = "pt-bench-weights"
COUNT = 100
OUT = Path(__file__).resolve().parent / "weights-100.json"
EHR_SYSTEM = "urn:mdt-broker:demo:county-ehr"  # as tests/scenarios/harness.py
BASE = "https://county-ehr.example.org/fhir/R4"


def observation(i: int) -> dict:
    """Weight number ``i``: one a week, slowly rising, each with its own lastUpdated."""
    taken = datetime(2024, 1, 3, 10, 30, tzinfo=timezone.utc) + timedelta(days=7 * i)
    return {
        "resourceType": "Observation",
        "id": f"bench-weight-{i:03d}",
        "meta": {"lastUpdated": (taken + timedelta(hours=2)).isoformat().replace("+00:00", "Z")},
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs", "display": "Vital Signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "effectiveDateTime": taken.isoformat().replace("+00:00", "Z"),
        "valueQuantity": {"value": round(41.0 + 0.05 * i, 2), "unit": "kg",
                          "system": "http://unitsofmeasure.org", "code": "kg"},
    }


def bundle() -> dict:
    """A transaction Bundle the Node FHIR test server accepts as a seed."""
    patient = {"resourceType": "Patient", "id": PATIENT_ID, "meta": {"lastUpdated": "2024-01-02T09:00:00Z"},
               "identifier": [{"system": EHR_SYSTEM, "value": "CE-BENCH-0100"}], "active": True,
               "name": [{"use": "official", "family": "Benchmark", "given": ["Invented"]}],
               "gender": "female", "birthDate": "2011-06-01"}
    resources = [patient, *(observation(i) for i in range(COUNT))]
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"fullUrl": f"{BASE}/{r['resourceType']}/{r['id']}", "resource": r,
                       "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]}


def write(path: Path = OUT) -> Path:
    """Write the seed Bundle (stable formatting) and return its path."""
    path.write_text(json.dumps(bundle(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write())
