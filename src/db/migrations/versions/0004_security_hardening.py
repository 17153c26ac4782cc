"""Security hardening: sealed notification secrets, email-change tokens, client-bound sessions,
mail deliveries.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_PURPOSES = "purpose IN ('password_reset', 'email_verification')"
_NEW_PURPOSES = "purpose IN ('password_reset', 'email_verification', 'email_change', 'email_undo')"


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("sealed", sa.Text(), nullable=True))
        batch.add_column(sa.Column("sealed_until", sa.DateTime(timezone=True), nullable=True))
        batch.create_index(batch.f("ix_outbox_sealed_until"), ["sealed_until"], unique=False)

    # One-time tokens used to be published readable: take them out of every row still holding
    # one. A reset or verification link already mailed keeps working (its hash is in
    # one_time_tokens); one not yet mailed is requested again.
    op.execute(
        "UPDATE outbox SET payload = '{}' WHERE type IN "
        "('user.password_reset_requested', 'user.verification_requested')"
    )

    with op.batch_alter_table("one_time_tokens") as batch:
        batch.add_column(sa.Column("email", sa.String(length=320), nullable=True))
        batch.drop_constraint(op.f("ck_one_time_tokens_purpose"), type_="check")
        batch.create_check_constraint("purpose", _NEW_PURPOSES)

    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("client_id", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("sign_in_network", sa.String(length=45), nullable=True))
        batch.create_index(
            "ix_sessions_user_id_sign_in_network", ["user_id", "sign_in_network"], unique=False
        )

    op.create_table(
        "mail_deliveries",
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("sealed", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_mail_deliveries")),
    )
    op.create_index(
        "ix_mail_deliveries_due",
        "mail_deliveries",
        ["status", "topic", "next_attempt_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_mail_deliveries_due", table_name="mail_deliveries")
    op.drop_table("mail_deliveries")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_index("ix_sessions_user_id_sign_in_network")
        batch.drop_column("sign_in_network")
        batch.drop_column("client_id")
    op.execute("DELETE FROM one_time_tokens WHERE purpose IN ('email_change', 'email_undo')")
    with op.batch_alter_table("one_time_tokens") as batch:
        batch.drop_constraint(op.f("ck_one_time_tokens_purpose"), type_="check")
        batch.create_check_constraint("purpose", _OLD_PURPOSES)
        batch.drop_column("email")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index(batch.f("ix_outbox_sealed_until"))
        batch.drop_column("sealed_until")
        batch.drop_column("sealed")
