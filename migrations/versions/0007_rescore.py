"""rescore: a job that judges another job's stored answers again, and the reviews it carried

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job", sa.Column("rescore_of", sa.Uuid(), nullable=True))
    op.add_column("job", sa.Column("reviews_carried", sa.Integer(), nullable=True))
    op.add_column("job", sa.Column("reviews_not_carried", sa.Integer(), nullable=True))
    op.create_foreign_key(
        "fk_job_rescore_of", "job", "job", ["rescore_of"], ["id"], ondelete="SET NULL"
    )
    # Deleting a job sets its rescores' link to null: found by this index, not by a scan.
    op.create_index(
        "ix_job_rescore_of",
        "job",
        ["rescore_of"],
        postgresql_where=sa.text("rescore_of IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_job_rescore_of", table_name="job")
    op.drop_constraint("fk_job_rescore_of", "job", type_="foreignkey")
    op.drop_column("job", "reviews_not_carried")
    op.drop_column("job", "reviews_carried")
    op.drop_column("job", "rescore_of")
