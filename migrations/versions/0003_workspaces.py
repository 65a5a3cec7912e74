"""workspaces and API keys; datasets and jobs belong to a workspace

Revision ID: 0003
Revises: 0002

Rows from before workspaces go to a workspace named "default".
"""

import secrets
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workspace",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("webhook_secret", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "api_key",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspace.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_index("ix_api_key_workspace_id", "api_key", ["workspace_id"])

    default = uuid.uuid4()
    has_rows = op.get_bind().execute(sa.text("SELECT EXISTS (SELECT 1 FROM dataset)")).scalar()
    if has_rows:
        op.execute(
            sa.text(
                "INSERT INTO workspace (id, name, webhook_secret, created_at)"
                " VALUES (:id, 'default', :secret, now())"
            ).bindparams(id=default, secret=secrets.token_urlsafe(32))
        )
    for table in ("dataset", "job"):
        op.add_column(table, sa.Column("workspace_id", sa.Uuid(), nullable=True))
        op.execute(sa.text(f"UPDATE {table} SET workspace_id = :id").bindparams(id=default))
        op.alter_column(table, "workspace_id", nullable=False)
        op.create_foreign_key(
            f"fk_{table}_workspace_id",
            table,
            "workspace",
            ["workspace_id"],
            ["id"],
            ondelete="CASCADE",
        )
        op.create_index(f"ix_{table}_workspace_id", table, ["workspace_id"])
    op.drop_constraint("uq_job_idempotency_key", "job")
    op.create_unique_constraint(
        "uq_job_idempotency_key", "job", ["workspace_id", "idempotency_key"]
    )


def downgrade() -> None:
    op.drop_constraint("uq_job_idempotency_key", "job")
    op.create_unique_constraint("uq_job_idempotency_key", "job", ["idempotency_key"])
    for table in ("job", "dataset"):
        op.drop_index(f"ix_{table}_workspace_id", table_name=table)
        op.drop_constraint(f"fk_{table}_workspace_id", table)
        op.drop_column(table, "workspace_id")
    op.drop_index("ix_api_key_workspace_id", table_name="api_key")
    op.drop_table("api_key")
    op.drop_table("workspace")
