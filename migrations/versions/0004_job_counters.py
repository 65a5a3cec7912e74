"""job progress counters: done, per category, flagged, generations

Revision ID: 0004
Revises: 0003

Workers add each chunk's counts to its job as they write its verdicts; jobs from before are
counted here from their verdicts and chunks.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = {
    "done": sa.Integer(),
    "highly_known": sa.Integer(),
    "maybe_known": sa.Integer(),
    "weakly_known": sa.Integer(),
    "unknown": sa.Integer(),
    "flagged": sa.Integer(),
    "generations": sa.BigInteger(),
    "cached_generations": sa.BigInteger(),
}


def upgrade() -> None:
    for column, column_type in COUNTERS.items():
        op.add_column("job", sa.Column(column, column_type, nullable=False, server_default="0"))
    op.execute(
        """
        UPDATE job SET done = v.done, highly_known = v.highly_known,
            maybe_known = v.maybe_known, weakly_known = v.weakly_known, unknown = v.unknown,
            flagged = v.flagged
        FROM (
            SELECT job_id, count(*) AS done,
                count(*) FILTER (WHERE category = 'HighlyKnown') AS highly_known,
                count(*) FILTER (WHERE category = 'MaybeKnown') AS maybe_known,
                count(*) FILTER (WHERE category = 'WeaklyKnown') AS weakly_known,
                count(*) FILTER (WHERE category = 'Unknown') AS unknown,
                count(*) FILTER (WHERE flagged) AS flagged
            FROM verdict GROUP BY job_id
        ) AS v
        WHERE job.id = v.job_id
        """
    )
    op.execute(
        """
        UPDATE job SET generations = c.generations, cached_generations = c.cached_generations
        FROM (
            SELECT job_id, sum(generations) AS generations,
                sum(cached_generations) AS cached_generations
            FROM chunk GROUP BY job_id
        ) AS c
        WHERE job.id = c.job_id
        """
    )
    for column in COUNTERS:
        op.alter_column("job", column, server_default=None)


def downgrade() -> None:
    for column in COUNTERS:
        op.drop_column("job", column)
