"""Gateway mode (Open WebUI's connection, forwarded user headers) while another process
holds SQLite's write lock: a person seen for the first time needs a catalog write, and a
request that cannot make it within store_timeout gets the same 503 ``store_unavailable``
with ``Retry-After`` as every other request that cannot reach the store, not a 500; once
the lock frees, the same request goes through and the person is created once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.gateway.harness import channel, running_gateway
from tests.gateway.test_store_lock import STORE_TIMEOUT, assert_store_unavailable
from tests.support.store_loop_locker import write_lock_held
from tests.support.upstream import RunningUpstream

pytestmark = pytest.mark.timeout(60)

PERSON = {
    "X-OpenWebUI-User-Id": "owui-new-person",
    "X-OpenWebUI-User-Email": "new.person@example.org",
    "X-OpenWebUI-User-Role": "user",
}
BODY = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def test_a_new_open_webui_person_during_a_held_lock_gets_503_not_500(
    upstream: RunningUpstream, tmp_path: Path
) -> None:
    with running_gateway(
        tmp_path, [channel("main", upstream, ["demo-model"])], store_timeout=STORE_TIMEOUT
    ) as gw:
        key = gw.key("openwebui", trusted_openwebui=True)
        headers = {"authorization": f"Bearer {key}", **PERSON}
        url = f"{gw.base_url}/chat/completions"
        with write_lock_held(tmp_path / "quotagate.db"):
            started = time.monotonic()
            refused = gw.http.post(url, headers=headers, json=BODY)
            spent = time.monotonic() - started
            assert_store_unavailable(refused.status_code, refused.headers, refused.json())
            assert spent < STORE_TIMEOUT + 1.0
        answered = gw.http.post(url, headers=headers, json=BODY)
        assert answered.status_code == 200, answered.text
        events = await gw.settled(1, timeout=10)
        assert [e.user_id for e in events] == ["owui-new-person"]
        assert await gw.pending() == 0
