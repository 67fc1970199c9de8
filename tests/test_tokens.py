"""Counting prompt tokens before the call, offline: the estimate errs on the side of more.

tiktoken's encodings are downloaded on first use; these tests must not need the internet,
so they use the offline estimate explicitly, or a model tiktoken does not know."""

from __future__ import annotations

import math
from typing import Any

import pytest

from quotagate.core import tokens
from quotagate.core.tokens import PER_MESSAGE_OVERHEAD, PER_REPLY_OVERHEAD, TokenCounter

OFFLINE = TokenCounter(use_tiktoken=False)


def test_the_offline_estimate_is_bytes_over_three_rounded_up() -> None:
    assert OFFLINE.text("") == 0
    assert OFFLINE.text("a") == 1
    assert OFFLINE.text("abcdef") == 2
    assert OFFLINE.text("abcdefg") == 3
    # non-ASCII text is counted by its UTF-8 bytes: CJK takes 3 bytes a character
    assert OFFLINE.text("日本語") == 3
    assert OFFLINE.text("ü" * 3) == 2


def test_the_estimate_is_conservative_for_english() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 50
    # real BPE tokenizers need about one token per word and punctuation mark here
    words_and_marks = len(text.split()) + text.count(".")
    assert OFFLINE.text(text) >= words_and_marks


def test_a_model_without_a_known_encoding_falls_back_to_the_estimate() -> None:
    counter = TokenCounter()
    assert counter.text("hello world, hello tokens", "my-local-llama") == math.ceil(25 / 3)


def test_a_tighter_bytes_per_token_counts_more() -> None:
    text = "x" * 300
    assert TokenCounter(2.0, use_tiktoken=False).text(text) == 150
    assert TokenCounter(4.0, use_tiktoken=False).text(text) == 75
    with pytest.raises(ValueError):
        TokenCounter(0)


def test_messages_count_every_text_part_plus_the_chat_overhead() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "abc"},
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "abcdef"}, "xyz"]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "lookup", "arguments": '{"q": "x"}'}}],
        },
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}}]},
    ]
    expected = PER_REPLY_OVERHEAD + 4 * PER_MESSAGE_OVERHEAD
    expected += sum(
        OFFLINE.text(t)
        for t in (
            "system",
            "abc",
            "user",
            "alice",
            "abcdef",
            "xyz",
            "assistant",
            "lookup",
            '{"q": "x"}',
            "user",
        )
    )
    assert OFFLINE.messages(messages) == expected


def test_an_empty_chat_still_costs_the_reply_overhead() -> None:
    assert OFFLINE.messages([]) == PER_REPLY_OVERHEAD


def test_tiktoken_is_used_when_its_encoding_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    class OneTokenPerWord:
        def encode(self, text: str, *, disallowed_special: Any = ()) -> list[int]:
            return list(range(len(text.split())))

    monkeypatch.setattr(
        tokens, "_encoding_for", lambda model: OneTokenPerWord() if model == "gpt-4o" else None
    )
    counter = TokenCounter()
    assert counter.text("four words right here", "gpt-4o") == 4
    assert counter.text("four words right here", "other") == math.ceil(21 / 3)
    assert TokenCounter(use_tiktoken=False).text("four words right here", "gpt-4o") == 7
