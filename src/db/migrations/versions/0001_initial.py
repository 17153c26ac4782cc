"""Initial revision: the baseline every later schema change builds on.

The service core owns no tables of its own; this revision exists so that "migrated" has a meaning
from day one (readiness and start-up compare the database against the head revision).

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
