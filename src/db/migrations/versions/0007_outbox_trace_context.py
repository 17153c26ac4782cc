"""The outbox keeps each event's W3C trace context (tracing, docs/tracing.md).

Nullable and without a default: rows recorded before, or with tracing off, have none, and their
CloudEvents carry no ``traceparent``. Adding a nullable column rewrites nothing on PostgreSQL.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(
            sa.Column(
                "trace_context",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    # Only the link to traces is lost: every event is still published, without traceparent.
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("trace_context")
