"""Open WebUI integration: a Filter Function and a Pipelines filter, as files to install.

Both files are self-contained (standard library plus pydantic, which Open WebUI and the
Pipelines server ship) and talk to QuotaGate over its quota API
(:mod:`quotagate.gateway.engine_api`); they never import this package. Print them with
``python -m quotagate.openwebui function`` or ``... pipeline`` (and the Pipelines filter's
opt-in companion pipe with ``... refusal-pipe``); docs/openwebui.md tells how to install
each, and when gateway mode (no file at all) is the better choice.
"""

from __future__ import annotations

from importlib.resources import files

FUNCTION_FILE = "filter_function.py"
PIPELINE_FILE = "pipelines_filter.py"
REFUSAL_PIPE_FILE = "pipelines_refusal.py"
#: the id the docs and tests install the Function under
FUNCTION_ID = "quotagate"


def function_source() -> str:
    """The Filter Function to paste into Admin → Functions."""
    return files(__package__).joinpath(FUNCTION_FILE).read_text(encoding="utf-8")


def pipeline_source() -> str:
    """The filter to drop into the Pipelines server's pipelines directory."""
    return files(__package__).joinpath(PIPELINE_FILE).read_text(encoding="utf-8")


def refusal_pipe_source() -> str:
    """The pipe that lets the Pipelines filter's refusals reach the chat as a reply."""
    return files(__package__).joinpath(REFUSAL_PIPE_FILE).read_text(encoding="utf-8")


__all__ = [
    "FUNCTION_FILE",
    "FUNCTION_ID",
    "PIPELINE_FILE",
    "REFUSAL_PIPE_FILE",
    "function_source",
    "pipeline_source",
    "refusal_pipe_source",
]
