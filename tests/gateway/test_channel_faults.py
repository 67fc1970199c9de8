"""Checks from outside of what reaches an upstream, and what of its answer reaches a client.

The upstreams are raw asyncio servers (tests/support/upstream_client_upstream.py and
tests/support/channel_faults_upstream.py); the clients are the real `openai` SDK.
"""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import openai
import orjson
import pytest

from tests.gateway.harness import channel, running_gateway
from tests.support.channel_faults_upstream import gzip_answer, running_canned_upstream
from tests.support.upstream import RunningUpstream
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


def _completion(text: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-gz",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }
    )


async def test_a_gzip_body_of_several_members_arrives_whole(tmp_path: Path) -> None:
    """RFC 1952: a gzip body is a series of members. All of them are the answer, not the
    first one cut off silently (a 200 whose JSON ends half way)."""
    whole = _completion("all of it")
    members = gzip.compress(whole[:40]) + gzip.compress(whole[40:])
    with (
        running_canned_upstream(lambda _: gzip_answer(members)) as up,
        running_gateway(tmp_path, [channel("gz", up.base_url, ["m"])]) as gw,
    ):
        answer = gw.client(gw.key("alice")).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert answer.choices[0].message.content == "all of it"
        assert [(e.prompt_tokens, e.completion_tokens) for e in await gw.events()] == [(5, 3)]


async def test_a_gzip_body_cut_short_is_a_502_not_a_partial_answer(tmp_path: Path) -> None:
    """Framing intact (Content-Length matches) but the gzip stream ends half way: the
    answer is unusable, so the client gets a clean 502 and nothing is charged."""
    cut = gzip.compress(_completion("x" * 2000))[:-30]
    with (
        running_canned_upstream(lambda _: gzip_answer(cut)) as up,
        running_gateway(tmp_path, [channel("gz", up.base_url, ["m"])]) as gw,
    ):
        with pytest.raises(openai.APIStatusError) as failed:
            gw.client(gw.key("alice")).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
        assert failed.value.status_code == 502
        assert "does not decompress" in failed.value.response.json()["error"]["message"]
        assert await gw.pending() == 0 and await gw.events() == []


async def test_an_upstream_4xx_that_names_its_host_reaches_the_client_without_it(
    tmp_path: Path,
) -> None:
    """A 400 whose message echoes the request it got (its Host header: the upstream's
    internal address) keeps its message for the client, minus the host and port."""
    where: list[str] = []

    def refuse(_: dict[str, object]) -> bytes:
        message = f"bad request to {where[0]} (Host: {where[0]}); upstream host {where[1]}"
        data = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
        return (
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data) + data
        )

    with running_canned_upstream(refuse) as up:
        origin = up.base_url.split("/")[2]
        where += [origin, origin.split(":")[0]]
        with (
            running_gateway(tmp_path, [channel("raw", up.base_url, ["m"])]) as gw,
            pytest.raises(openai.BadRequestError) as refused,
        ):
            gw.client(gw.key("alice")).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
    message = refused.value.response.json()["error"]["message"]
    assert "127.0.0.1" not in message and origin.split(":")[1] not in message
    assert message == ("bad request to [upstream] (Host: [upstream]); upstream host [upstream]")


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (402, "Insufficient credits. Add more using https://openrouter.ai/settings/credits"),
        (404, "The model `meta-llama/x` does not exist or you do not have access to it."),
        (407, "Proxy authentication required"),
    ],
)
async def test_upstream_refusals_that_are_the_operators_are_a_502_or_the_next_channel(
    status: int, message: str, upstream: RunningUpstream, tmp_path: Path
) -> None:
    """The provider account out of credit (OpenRouter's 402), a model the channel is
    configured for that the provider does not have (404), a proxy refusing the gateway
    (407): nothing the client can act on, so not its 4xx."""
    data = orjson.dumps({"error": {"message": message, "code": status}})
    answer = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n" % status
    answer += b"Content-Length: %d\r\n\r\n" % len(data) + data
    with running_canned_upstream(lambda _: answer) as up:
        refusing = channel("refusing", up.base_url, ["demo-model"], priority=1)
        with running_gateway(tmp_path, [refusing]) as gw:
            client = gw.client(gw.key("alice"))
            with pytest.raises(openai.APIStatusError) as failed:
                client.chat.completions.create(
                    model="demo-model", messages=[{"role": "user", "content": "hi"}]
                )
            assert failed.value.status_code == 502
            assert failed.value.response.json()["error"]["code"] == "upstream_error"
            assert message not in failed.value.response.text
        (tmp_path / "2").mkdir()
        backup = channel("backup", upstream, ["demo-model"])
        with running_gateway(tmp_path / "2", [refusing, backup]) as gw:
            answered = gw.client(gw.key("alice")).chat.completions.create(
                model="demo-model", messages=[{"role": "user", "content": "hi"}]
            )
            assert answered.choices[0].message.content
            assert [event.channel for event in await gw.events()] == ["backup"]


async def test_an_oversized_upstream_header_is_not_passed_on(tmp_path: Path) -> None:
    """An allowed header (x-request-id) 60 KB long: HTTP clients refuse a response with a
    header that large (aiohttp, which Open WebUI uses, above 8 KB), so one upstream could
    break every answer; the header is dropped, the answer arrives."""
    data = _completion("fine")
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: "
        + b"r" * 60_000
        + b"\r\nopenai-processing-ms: 7\r\nContent-Length: %d\r\n\r\n" % len(data)
        + data
    )
    with (
        running_canned_upstream(lambda _: answer) as up,
        running_gateway(tmp_path, [channel("raw", up.base_url, ["m"])]) as gw,
    ):
        raw = gw.client(gw.key("alice")).chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    assert raw.parse().choices[0].message.content == "fine"
    assert "x-request-id" not in raw.headers
    assert raw.headers["openai-processing-ms"] == "7"


@pytest.mark.parametrize("encoding", [b"br", b"zstd", b"gzip, gzip"])
async def test_an_answer_in_an_encoding_the_gateway_cannot_read_is_a_502(
    encoding: bytes, tmp_path: Path
) -> None:
    """The gateway sends no Accept-Encoding, which HTTP reads as "any": an upstream may
    answer in brotli. Passing those bytes on as JSON gave the client garbage and charged
    no completion (the usage could not be read); it is a failure of the channel."""
    data = gzip.compress(gzip.compress(_completion("x")))
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: "
    answer += encoding + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data
    with (
        running_canned_upstream(lambda _: answer) as up,
        running_gateway(tmp_path, [channel("raw", up.base_url, ["m"])]) as gw,
    ):
        with pytest.raises(openai.APIStatusError) as failed:
            gw.client(gw.key("alice")).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
        assert failed.value.status_code == 502
        assert await gw.pending() == 0 and await gw.events() == []
