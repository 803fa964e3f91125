"""Claims (#28): a watcher claims a hot-folder photo before its model runs, so two watchers on one folder run the
model once per photo. A claim is deleted once the photo's inspection is recorded; one left by a killed watcher is
taken over (station/claims.py).

Revision ID: 0004_claims
Revises: 0003_model_boxes
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_claims"
down_revision = "0003_model_boxes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "claims",
        sa.Column("source_key", sa.Text, primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("claims")
