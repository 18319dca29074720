"""Request and response bodies of the court order API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from broker.registry.schemas import Strict

_ID = r"^[A-Za-z0-9][A-Za-z0-9\-._:]{0,127}$"
# Printable text without control characters, so a case number cannot forge log or CSV lines.
_TEXT = r"^[^\x00-\x1f\x7f]+$"


class RecipientIn(Strict):
    kind: Literal["person", "role", "agency"] = Field(description="A staff subject id, a team role, or an agency")
    value: str = Field(pattern=_ID)


class CourtOrderIn(Strict):
    youth_id: str = Field(pattern=_ID)
    case_number: str = Field(min_length=1, max_length=64, pattern=_TEXT)
    court: str = Field(min_length=1, max_length=200, pattern=_TEXT)
    categories: list[str] = Field(min_length=1, max_length=50, description="Vocabulary categories the order "
                                  "reaches; psychotherapy-notes is refused (45 CFR 164.508(a)(2))")
    purposes: list[str] = Field(min_length=1, max_length=20, description="Vocabulary purpose-of-use codes")
    recipients: list[RecipientIn] = Field(min_length=1, max_length=50)
    period_start: datetime | None = Field(None, description="Defaults to now; must carry a time zone")
    period_end: datetime | None = Field(None, description="Open-ended when absent; must be after period_start")


class CourtOrderOut(BaseModel):
    id: str
    youth_id: str
    case_number: str
    court: str
    categories: list[str]
    purposes: list[str]
    recipients: list[RecipientIn]
    period_start: datetime
    period_end: datetime | None
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    revoked_by: str | None


class CourtOrderList(BaseModel):
    youth_id: str
    orders: list[CourtOrderOut]
