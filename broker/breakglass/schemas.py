"""Request and response bodies of the break-glass API; the reason goes in and never comes out."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from broker.registry.schemas import Strict

REASON_MIN, REASON_MAX = 10, 2000


class BreakGlassIn(Strict):
    purpose: Literal["ETREAT", "THREAT"] = Field(description="Emergency treatment, or averting a serious and "
                                                 "imminent threat")
    reason: str = Field(description=f"Why, in free text ({REASON_MIN}-{REASON_MAX} characters); stored for the "
                        "reviewer only, never logged or returned")

    @field_validator("reason")
    @classmethod
    def _substantive(cls, value: str) -> str:
        """A reviewer needs a real explanation; the error names the field, never the text."""
        value = value.strip()
        if not REASON_MIN <= len(value) <= REASON_MAX:
            raise ValueError("reason length")
        return value


class BreakGlassOut(BaseModel):
    id: str
    mdt_id: str
    purpose: str
    granted_at: datetime
    expires_at: datetime
    review_status: str


class BreakGlassList(BaseModel):
    mdt_id: str
    grants: list[BreakGlassOut]
