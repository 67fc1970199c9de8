"""
title: QuotaGate refusals for Open WebUI Pipelines
author: QuotaGate
version: 0.1.0
license: MIT
description: Shows QuotaGate's refusal in the chat, for the QuotaGate Pipelines filter.
"""

# An opt-in companion of QuotaGate's Pipelines filter (pipelines_filter.py): drop both files
# into the Pipelines server's pipelines directory and set the filter's `refusal_model` valve
# (or QUOTAGATE_REFUSAL_MODEL) to this pipe's id, "quotagate-refusal".
#
# Why it exists: Open WebUI 0.12.4 shows only the HTTP reason phrase ("Too Many Requests")
# of a Pipelines filter's error answer, never its text. But after a successful inlet it
# routes the call to whatever `model` the returned body names, so on a refusal in the web
# UI the filter answers 200 with the body pointed at this pipe and the refusal text in
# `quotagate_refusal`; the pipe answers that text as the reply. No model is called.
#
# It calls nothing and needs nothing but the Pipelines server. It has no `type` attribute
# on purpose: the Pipelines server lists a module as a pipe (a model) only without one.

from __future__ import annotations

from typing import Any

#: the body field the filter carries the refusal text in (the filter names it the same)
QG_REFUSAL_FIELD = "quotagate_refusal"
QG_NO_REFUSAL = (
    "This model only shows QuotaGate's messages about chat quotas. Please pick another model."
)


class Pipeline:
    def __init__(self) -> None:
        self.id = "quotagate-refusal"
        self.name = "QuotaGate notices"

    async def on_startup(self) -> None:
        pass

    async def on_shutdown(self) -> None:
        pass

    def pipe(self, user_message: str, model_id: str, messages: list[Any], body: dict) -> str:
        """The refusal the filter put in the body; anyone who picks this model by hand
        gets a pointer elsewhere (nothing is called either way)."""
        text = body.get(QG_REFUSAL_FIELD)
        return text if isinstance(text, str) and text else QG_NO_REFUSAL
