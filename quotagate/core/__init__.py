"""Pure quota rules: limits, windows, pricing, token estimation and the admit decision.

Nothing in this package performs I/O or imports another part of QuotaGate, so every
rule can be tested on its own.
"""
