"""reviews: a person's decision on each flagged example's suggested relabel

Revision ID: 0006
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DECISION = sa.Enum("accept", "reject", "override", name="review_decision")


def upgrade() -> None:
    op.create_table(
        "review",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("decision", DECISION, nullable=False),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("api_key_id", sa.Uuid(), nullable=True),
        sa.Column("reviewed_by", sa.String(length=255), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id", "position"],
            ["verdict.job_id", "verdict.position"],
            name="fk_review_verdict",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_key.id"], ondelete="SET NULL"),
        sa.CheckConstraint(
            "(decision = 'override') = (answer IS NOT NULL)", name="ck_review_override_answer"
        ),
        sa.PrimaryKeyConstraint("job_id", "position"),
    )


def downgrade() -> None:
    op.drop_table("review")
    DECISION.drop(op.get_bind())
