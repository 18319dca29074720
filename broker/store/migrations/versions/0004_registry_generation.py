"""registry generation, raised by triggers on every registry change

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 07:05:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# Every table whose rows decide who may see what about a youth. A change to any of them, by any
# writer, must end every cached context (broker/pipeline/context_cache.py).
WATCHED = ("agencies", "staff", "youth", "youth_identifiers", "mdts", "memberships", "consents",
           "court_orders", "break_glass_grants")
BUMP = "UPDATE registry_generation SET value = value + 1 WHERE id = 1"


def upgrade() -> None:
    op.create_table('registry_generation',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('value', sa.BigInteger(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.execute("INSERT INTO registry_generation (id, value) VALUES (1, 0)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE FUNCTION registry_generation_bump() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN {BUMP}; RETURN NULL; END $$")
        for table in WATCHED:
            op.execute(f"CREATE TRIGGER registry_generation_{table} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
                       f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION registry_generation_bump()")
    else:  # SQLite: row triggers only, one per kind of change
        for table in WATCHED:
            for event in ("INSERT", "UPDATE", "DELETE"):
                op.execute(f"CREATE TRIGGER registry_generation_{table}_{event.lower()} AFTER {event} ON {table} "
                           f"BEGIN {BUMP}; END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in WATCHED:
            op.execute(f"DROP TRIGGER IF EXISTS registry_generation_{table} ON {table}")
        op.execute("DROP FUNCTION IF EXISTS registry_generation_bump()")
    else:
        for table in WATCHED:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS registry_generation_{table}_{event}")
    op.drop_table('registry_generation')
