"""Alembic migrations of QuotaGate's SQL schema (run by :func:`quotagate.store.migrate.upgrade`)."""
