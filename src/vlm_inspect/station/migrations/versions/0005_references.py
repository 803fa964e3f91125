"""References (#26): what each verdict was judged against, and each product's golden sets chosen on the history
page from confirmed-OK records. Older records have none (NULL: not recorded).

Revision ID: 0005_references
Revises: 0004_claims
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_references"
down_revision = "0004_claims"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("inspections", sa.Column("reference_json", sa.Text))
    op.create_table(
        "golden_sets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("product", sa.String(80), nullable=False, index=True),
        sa.Column("photos_json", sa.Text, nullable=False),
        sa.Column("operator", sa.String(80), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("golden_sets")
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("reference_json")
