"""Who is calling: the API key of ``Authorization: Bearer <key>``, and the user it charges.

A key lookup is a SQL query and a hash comparison; the gateway keeps a positive answer
for a few seconds, indexed by the SHA-256 of the secret (the secret itself is never kept
nor logged). The cache is emptied whenever the catalog changes, so a revoked key stops
working within the catalog refresh interval.

Whom a key's request is charged to (its own user, or for a ``--trusted-openwebui`` key
the person Open WebUI names) is decided in :mod:`quotagate.gateway.openwebui`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from quotagate.gateway.errors import unauthorized
from quotagate.store.catalog import ApiKey, Catalog

MAX_CACHED = 10_000


class Authenticator:
    def __init__(
        self,
        catalog: Catalog,
        ttl: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.ttl = ttl
        self.monotonic = monotonic
        self._cache: dict[bytes, tuple[ApiKey, float]] = {}

    def clear(self) -> None:
        self._cache.clear()

    def key(self, headers: dict[bytes, bytes]) -> ApiKey:
        """The live key of the request, or a 401."""
        header = headers.get(b"authorization")
        if not header:
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        scheme, _, secret = header.partition(b" ")
        secret = secret.strip()
        if scheme.lower() != b"bearer" or not secret:
            raise unauthorized("The Authorization header must be 'Bearer <key>'.")
        digest = hashlib.sha256(secret).digest()
        now = self.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            text = secret.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        key = self.catalog.authenticate(text) if text else None
        if key is None:
            self._cache.pop(digest, None)
            raise unauthorized("Incorrect API key provided.")
        if self.ttl > 0:
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (key, now + self.ttl)
        return key
