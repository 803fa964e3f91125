"""The first station schema: photos, inspections, reviews.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "photos",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("suffix", sa.String(8), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "inspections",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("photo_sha256", sa.String(64), sa.ForeignKey("photos.sha256"), nullable=False),
        sa.Column("file_name", sa.String(255), nullable=False),
        sa.Column("verdict", sa.String(2)),
        sa.Column("p_ng", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("description", sa.Text),
        sa.Column("model_name", sa.String(255)),
        sa.Column("model_hash", sa.String(64)),
        sa.Column("latency_ms", sa.Float),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("source_key", sa.Text, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    for column in ("photo_sha256", "verdict", "model_name", "created_at"):
        op.create_index(f"ix_inspections_{column}", "inspections", [column])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", sa.Integer, sa.ForeignKey("inspections.id"), nullable=False),
        sa.Column("verdict", sa.String(2), nullable=False),
        sa.Column("defect_type", sa.String(80)),
        sa.Column("boxes_json", sa.Text, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("operator", sa.String(80), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_reviews_inspection_id", "reviews", ["inspection_id"])


def downgrade() -> None:
    op.drop_table("reviews")
    op.drop_table("inspections")
    op.drop_table("photos")
