"""SQLAlchemy Core tables of the four synthetic agency systems (one MetaData per source).

They are shaped the way county systems often are, not the way FHIR is: codes in local
vocabularies, reporter names stored on the referral row, addresses stored on the placement row.
The mapping files in connectors/mappings/ turn them into FHIR.
"""

from __future__ import annotations

from sqlalchemy import (Boolean, Column, Date, DateTime, ForeignKey, Integer, MetaData, Numeric, String, Table,
                        Text)

SOURCES = ("cws-cms", "probation-cms", "juvenile-court", "school-district")
MARKER_TABLE = "synthetic_dataset"


def _marker(metadata: MetaData) -> Table:
    """One row saying which seed and which rows (a hash) filled this database."""
    return Table(MARKER_TABLE, metadata, Column("seed", Integer, nullable=False),
                 Column("fingerprint", String(64), nullable=False))


def _stamp() -> Column:
    return Column("updated_at", DateTime(timezone=True), nullable=False)


cws = MetaData()
_marker(cws)
Table("cws_youth", cws,
      Column("youth_id", String(32), primary_key=True),
      Column("given_name", String(64), nullable=False),
      Column("family_name", String(64), nullable=False),
      Column("birth_date", Date, nullable=False))
Table("cws_case", cws,
      Column("case_id", Integer, primary_key=True),
      Column("youth_id", String(32), ForeignKey("cws_youth.youth_id"), nullable=False, index=True),
      Column("case_type", String(32), nullable=False),
      Column("status", String(16), nullable=False),
      Column("opened_on", Date, nullable=False),
      Column("closed_on", Date),
      Column("worker_name", String(96), nullable=False),
      _stamp())
Table("cws_placement_type", cws,
      Column("code", String(32), primary_key=True),
      Column("display", String(96), nullable=False))
Table("cws_placement", cws,
      Column("placement_id", Integer, primary_key=True),
      Column("youth_id", String(32), ForeignKey("cws_youth.youth_id"), nullable=False, index=True),
      Column("case_id", Integer, ForeignKey("cws_case.case_id"), nullable=False),
      Column("placement_type", String(32), ForeignKey("cws_placement_type.code"), nullable=False),
      Column("start_on", Date, nullable=False),
      Column("end_on", Date),
      Column("caregiver_name", String(128)),
      Column("address_line", String(128)),
      Column("city", String(64)),
      Column("state", String(2)),
      Column("postal_code", String(10)),
      _stamp())
Table("cws_referral", cws,
      Column("referral_id", Integer, primary_key=True),
      Column("youth_id", String(32), ForeignKey("cws_youth.youth_id"), nullable=False, index=True),
      Column("received_at", DateTime(timezone=True), nullable=False),
      Column("allegation_code", String(32), nullable=False),
      Column("allegation_summary", Text, nullable=False),
      Column("reporter_name", String(128), nullable=False),
      Column("reporter_role", String(64), nullable=False),
      Column("disposition", String(32), nullable=False),
      _stamp())
Table("cws_contact_note", cws,
      Column("note_id", Integer, primary_key=True),
      Column("youth_id", String(32), ForeignKey("cws_youth.youth_id"), nullable=False, index=True),
      Column("case_id", Integer, ForeignKey("cws_case.case_id"), nullable=False),
      Column("contact_at", DateTime(timezone=True), nullable=False),
      Column("contact_type", String(32), nullable=False),
      Column("worker_name", String(96), nullable=False),
      Column("youth_spoke", Boolean, nullable=False),
      Column("note_text", Text, nullable=False),
      _stamp())

probation = MetaData()
_marker(probation)
Table("prb_case", probation,
      Column("case_id", Integer, primary_key=True),
      Column("youth_id", String(32), nullable=False, index=True),
      Column("supervision_type", String(32), nullable=False),
      Column("status", String(16), nullable=False),
      Column("opened_on", Date, nullable=False),
      Column("closed_on", Date),
      Column("officer_name", String(96), nullable=False),
      _stamp())
Table("prb_condition", probation,
      Column("condition_id", Integer, primary_key=True),
      Column("case_id", Integer, ForeignKey("prb_case.case_id"), nullable=False),
      Column("youth_id", String(32), nullable=False, index=True),
      Column("condition_code", String(32), nullable=False),
      Column("condition_text", Text, nullable=False),
      Column("status", String(16), nullable=False),
      Column("start_on", Date, nullable=False),
      Column("end_on", Date),
      _stamp())
Table("prb_interview", probation,
      Column("interview_id", Integer, primary_key=True),
      Column("case_id", Integer, ForeignKey("prb_case.case_id"), nullable=False),
      Column("youth_id", String(32), nullable=False, index=True),
      Column("interview_at", DateTime(timezone=True), nullable=False),
      Column("officer_name", String(96), nullable=False),
      Column("statement_text", Text, nullable=False),
      _stamp())

court = MetaData()
_marker(court)
Table("crt_hearing", court,
      Column("hearing_id", Integer, primary_key=True),
      Column("youth_id", String(32), nullable=False, index=True),
      Column("case_number", String(32), nullable=False),
      Column("hearing_type", String(32), nullable=False),
      Column("status", String(16), nullable=False),
      Column("starts_at", DateTime(timezone=True), nullable=False),
      Column("ends_at", DateTime(timezone=True)),
      Column("department", String(32), nullable=False),
      _stamp())

school = MetaData()
_marker(school)
Table("edu_enrollment", school,
      Column("enrollment_id", Integer, primary_key=True),
      Column("youth_id", String(32), nullable=False, index=True),
      Column("school_year", String(9), nullable=False),
      Column("term", String(8), nullable=False),
      Column("term_start", Date, nullable=False),
      Column("term_end", Date, nullable=False),
      Column("grade_level", Integer, nullable=False),
      Column("status", String(16), nullable=False),
      _stamp())
Table("edu_attendance", school,
      Column("attendance_id", Integer, primary_key=True),
      Column("enrollment_id", Integer, ForeignKey("edu_enrollment.enrollment_id"), nullable=False),
      Column("youth_id", String(32), nullable=False, index=True),
      Column("days_enrolled", Integer, nullable=False),
      Column("days_present", Integer, nullable=False),
      _stamp())
Table("edu_credits", school,
      Column("credit_id", Integer, primary_key=True),
      Column("enrollment_id", Integer, ForeignKey("edu_enrollment.enrollment_id"), nullable=False),
      Column("youth_id", String(32), nullable=False, index=True),
      Column("credits_earned", Numeric(5, 1, asdecimal=False), nullable=False),
      _stamp())
Table("edu_iep", school,
      Column("iep_id", Integer, primary_key=True),
      Column("youth_id", String(32), nullable=False, index=True),
      Column("has_iep", Boolean, nullable=False),
      Column("as_of", Date, nullable=False),
      _stamp())

METADATA = {"cws-cms": cws, "probation-cms": probation, "juvenile-court": court, "school-district": school}
