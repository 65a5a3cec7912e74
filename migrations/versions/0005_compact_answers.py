"""verdict answers as distinct texts and indices; cache and answers as JSON; cache keys anew

Revision ID: 0005
Revises: 0003

A verdict's answers were `{"greedy": [...], "samples": [[...], ...]}` in JSONB; they become
`{"texts": [...], "greedy": [...], "samples": [[...], ...]}` in JSON, each distinct answer once
in `texts` (in the order first drawn) and every answer an index into it. The generation cache's
keys are made another way (a prompt's draws are counted by the cache, not by the request), so
its rows would never be read again: they are deleted.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COMPACT_ANSWERS = """
CREATE FUNCTION pg_temp.compact_answers(answers jsonb) RETURNS json LANGUAGE sql AS $$
WITH outputs AS (  -- every answer, with its place in the order drawn: greedy, then samples
    SELECT g.answer #>> '{}' AS answer, g.prompt, 0 AS sample, ARRAY[0, g.prompt, 0] AS place
    FROM jsonb_array_elements(answers -> 'greedy') WITH ORDINALITY AS g (answer, prompt)
    UNION ALL
    SELECT s.answer #>> '{}', p.prompt, s.sample, ARRAY[1, p.prompt, s.sample]
    FROM jsonb_array_elements(answers -> 'samples') WITH ORDINALITY AS p (samples, prompt),
        jsonb_array_elements(p.samples) WITH ORDINALITY AS s (answer, sample)
),
texts AS (
    SELECT answer, row_number() OVER (ORDER BY min(place)) - 1 AS i FROM outputs GROUP BY answer
),
indices AS (
    SELECT outputs.prompt, outputs.sample, texts.i FROM outputs JOIN texts USING (answer)
)
SELECT json_build_object(
    'texts', (SELECT coalesce(json_agg(answer ORDER BY i), '[]') FROM texts),
    'greedy', (
        SELECT coalesce(json_agg(i ORDER BY prompt), '[]') FROM indices WHERE sample = 0
    ),
    'samples', (
        SELECT coalesce(json_agg(
            (
                SELECT coalesce(json_agg(i ORDER BY sample), '[]') FROM indices
                WHERE sample > 0 AND indices.prompt = p.prompt
            )
            ORDER BY p.prompt
        ), '[]')
        FROM jsonb_array_elements(answers -> 'samples') WITH ORDINALITY AS p (samples, prompt)
    )
)
$$
"""

EXPAND_ANSWERS = """
CREATE FUNCTION pg_temp.expand_answers(answers json) RETURNS jsonb LANGUAGE sql AS $$
SELECT jsonb_build_object(
    'greedy', (
        SELECT coalesce(jsonb_agg(answers -> 'texts' -> (g.i #>> '{}')::int ORDER BY g.n), '[]')
        FROM json_array_elements(answers -> 'greedy') WITH ORDINALITY AS g (i, n)
    ),
    'samples', (
        SELECT coalesce(jsonb_agg(
            (
                SELECT coalesce(
                    jsonb_agg(answers -> 'texts' -> (s.i #>> '{}')::int ORDER BY s.n), '[]'
                )
                FROM json_array_elements(p.indices) WITH ORDINALITY AS s (i, n)
            )
            ORDER BY p.prompt
        ), '[]')
        FROM json_array_elements(answers -> 'samples') WITH ORDINALITY AS p (indices, prompt)
    )
)
$$
"""


def upgrade() -> None:
    op.execute("TRUNCATE generation")
    op.alter_column("generation", "texts", type_=sa.JSON(), postgresql_using="texts::json")
    op.execute(COMPACT_ANSWERS)
    op.alter_column(
        "verdict",
        "answers",
        type_=sa.JSON(),
        postgresql_using="pg_temp.compact_answers(answers)",
    )
    op.execute("DROP FUNCTION pg_temp.compact_answers")


def downgrade() -> None:
    op.execute(EXPAND_ANSWERS)
    op.alter_column(
        "verdict",
        "answers",
        type_=postgresql.JSONB(),
        postgresql_using="pg_temp.expand_answers(answers)",
    )
    op.execute("DROP FUNCTION pg_temp.expand_answers")
    op.execute("TRUNCATE generation")
    op.alter_column(
        "generation", "texts", type_=postgresql.JSONB(), postgresql_using="texts::jsonb"
    )
