"""counters: an index on expires_at, so that pruning ended windows needs no full scan

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 18:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_counters_expires_at", "counters", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_counters_expires_at", table_name="counters")
