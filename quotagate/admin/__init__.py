"""Operator tools: the `quotagate` command line (and, later, the REST admin API and dashboard).

Everything here is a client of the engine and the catalog; no quota rule lives here.
"""
