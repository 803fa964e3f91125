"""The line view (#29): each inspection's line, verdict margin and audit place; model baselines; their indexes.

Older records get line = their source, margin = |p(NG) − threshold| and audit_u from their id (the
same hash new records get, station/audit.py), so a store opened after the upgrade samples and
charts its whole history alike.

Revision ID: 0002_line_view
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from vlm_inspect.station.audit import audit_u

revision = "0002_line_view"
down_revision = "0001"
branch_labels = None
depends_on = None

BATCH = 20_000
INDEXES = {
    "ix_inspections_model_hash_line_id": ["model_hash", "line", "id"],
    "ix_inspections_margin": ["margin"],
    "ix_inspections_audit_u": ["audit_u"],
}
"""The line view's indexes: drift windows per line and model, the least-sure queue, the audit sample."""


def upgrade() -> None:
    op.add_column("inspections", sa.Column("line", sa.String(80)))
    op.add_column("inspections", sa.Column("margin", sa.Float))
    op.add_column("inspections", sa.Column("audit_u", sa.Float))
    _fill(op.get_bind())
    for name, columns in INDEXES.items():
        op.create_index(name, "inspections", columns)
    op.create_table(
        "baselines",
        sa.Column("model_hash", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(10), primary_key=True),
        sa.Column("model_name", sa.String(255)),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("threshold", sa.Float),
        sa.Column("scores_json", sa.Text, nullable=False),
        sa.Column("labels_json", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def _fill(connection: sa.Connection) -> None:
    """line, margin and audit_u of every old record (margin stays NULL where p(NG) or the threshold is)."""
    if connection.dialect.name == "postgresql":
        _fill_postgres(connection)
        return
    connection.execute(sa.text("UPDATE inspections SET line = source, margin = abs(p_ng - threshold)"))
    table = sa.table("inspections", sa.column("id", sa.Integer), sa.column("audit_u", sa.Float))
    write = table.update().where(table.c.id == sa.bindparam("b_id")).values(audit_u=sa.bindparam("b_u"))
    last = 0
    while True:
        ids = connection.execute(sa.select(table.c.id).where(table.c.id > last).order_by(table.c.id).limit(BATCH))
        rows = [{"b_id": i, "b_u": audit_u(i)} for i in ids.scalars()]
        if not rows:
            return
        connection.execute(write, rows)
        last = rows[-1]["b_id"]


def _fill_postgres(connection: sa.Connection) -> None:
    """Every row rewritten once: audit_u COPYed into a temporary table, then one joined UPDATE (row-by-row
    UPDATEs, and one UPDATE per column, took minutes per million rows there)."""
    connection.execute(sa.text("CREATE TEMPORARY TABLE audit_fill (id integer, u float8) ON COMMIT DROP"))
    ids = connection.execute(sa.text("SELECT id FROM inspections")).scalars().all()
    cursor = connection.connection.cursor()  # psycopg's own cursor, for COPY
    with cursor.copy("COPY audit_fill (id, u) FROM STDIN") as copy:
        for i in ids:
            copy.write_row((i, audit_u(i)))
    connection.execute(
        sa.text(
            "UPDATE inspections SET line = source, margin = abs(p_ng - threshold), audit_u = f.u "
            "FROM audit_fill f WHERE f.id = inspections.id"
        )
    )


def downgrade() -> None:
    op.drop_table("baselines")
    for name in INDEXES:
        op.drop_index(name, "inspections")
    with op.batch_alter_table("inspections") as batch:
        for column in ("audit_u", "margin", "line"):
            batch.drop_column(column)
