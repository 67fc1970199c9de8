"""End-to-end tests against a real Open WebUI (installed from PyPI into a cached venv)."""
