"""Request and response bodies of the registry API."""

from __future__ import annotations

from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, Field

_ID = r"^[A-Za-z0-9][A-Za-z0-9\-._:]{0,127}$"


class Strict(BaseModel):
    """Unknown fields are refused so that typos do not silently do nothing."""

    model_config = ConfigDict(extra="forbid")


class IdentifierIn(Strict):
    source: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$", description="Source (connector) name")
    system: str = Field(min_length=1, max_length=255, pattern=r"^\S+$")
    value: str = Field(pattern=r"^[A-Za-z0-9\-.]{1,64}$", description="The source's id for the youth")


class YouthIn(Strict):
    birth_date: date | None = None
    removed: bool = Field(False, description="Removed from parental custody (W&IC 300/361): a parent may then "
                          "not authorise mental health release (Civ. Code 56.106)")
    identifiers: list[IdentifierIn] = Field(default_factory=list, max_length=50)


class YouthOut(BaseModel):
    id: str
    birth_date: date | None
    removed: bool
    identifiers: list[IdentifierIn]


class MdtIn(Strict):
    youth_id: str = Field(pattern=_ID)
    lead_agency: str = Field(pattern=_ID)


class MembershipIn(Strict):
    sub: str = Field(pattern=_ID, description="The staff member's subject id")
    agency: str = Field(pattern=_ID)
    team_role: str = Field(pattern=r"^[a-z][a-z-]{1,63}$")
    statutory: bool = Field(False, description="The member holds their own statutory access "
                            "(assigned social worker or probation officer, treating clinician or program)")
    valid_from: datetime | None = Field(None, description="Defaults to now")
    valid_to: datetime | None = None


class MembershipOut(BaseModel):
    id: str
    sub: str
    agency: str
    team_role: str
    statutory: bool
    valid_from: datetime
    valid_to: datetime | None
    added_by: str
    ended_by: str | None


class MdtOut(BaseModel):
    id: str
    youth_id: str
    lead_agency: str
    opened_at: datetime
    closed_at: datetime | None
    members: list[MembershipOut]


class IdentifiersIn(Strict):
    identifiers: list[IdentifierIn] = Field(min_length=1, max_length=50, description="Identifiers to link to the "
                                            "youth, at most one per source; each system must be that source's "
                                            "identifier system")


class YouthLookupOut(BaseModel):
    youth_id: str
    mdts: list[str] = Field(description="The youth's open teams the caller may reach: those they are an active "
                            "member of, and every open team when a court order in force names them")
