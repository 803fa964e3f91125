"""The model's boxes on each inspection (#25): the defects its answer boxed, in the photo's pixels, and how many
boxes it wrote that could not be used. Older records have none (NULL: no box was asked for).

Revision ID: 0003_model_boxes
Revises: 0002_line_view
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_model_boxes"
down_revision = "0002_line_view"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("inspections", sa.Column("defects_json", sa.Text))
    op.add_column("inspections", sa.Column("boxes_dropped", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("inspections") as batch:
        batch.drop_column("boxes_dropped")
        batch.drop_column("defects_json")
