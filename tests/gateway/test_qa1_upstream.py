"""Checks from outside of what reaches an upstream, and what of its answer reaches a client.

The upstreams are raw asyncio servers (tests/support/upstream_client_upstream.py and
tests/support/qa1_upstream.py); the clients are the real `openai` SDK.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import openai
import pytest

from tests.gateway.harness import channel, running_gateway
from tests.support.upstream_client_upstream import running_raw_upstream


@pytest.mark.parametrize("stage", ["after-read", "after-status", "mid-body"])
async def test_a_request_an_upstream_may_have_read_goes_to_no_other_channel(
    stage: str, tmp_path: Path
) -> None:
    """Two channels in front of one provider (two keys, say): a connection dropped after
    the request left is a 502, not the same POST sent again through the other channel."""
    with running_raw_upstream() as up:
        channels = [
            channel("first", up.base_url, ["m"], priority=1),
            channel("second", up.base_url, ["m"]),
        ]
        with running_gateway(tmp_path, channels) as gw:
            client = gw.client(gw.key("alice"))
            with pytest.raises(openai.APIStatusError) as failed:
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"{stage} x"}], max_tokens=5
                )
            assert failed.value.status_code == 502
            assert await gw.pending() == 0 and await gw.events() == []  # nothing charged
    assert Counter(up.generations)["x"] == 1  # generated once, not once per channel
