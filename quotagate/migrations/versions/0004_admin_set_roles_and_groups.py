"""users.role_pinned and memberships.source: what an admin set is not synced away

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 06:10:00.000000

A role given with `quotagate users set-role` is pinned (Open WebUI's role no longer
replaces it); a membership records whether an admin added it (`admin`) or the caller's
sync did (`sync`: Open WebUI's groups sent by a filter), and a sync only adds and removes
its own. Memberships that exist before this revision count as an admin's: nothing an admin
may have set disappears on upgrade.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("role_pinned", sa.Boolean(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("source", sa.String(length=16), server_default="admin", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.drop_column("source")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("role_pinned")
