"""Who a request that comes from Open WebUI is for, and keeping that person in the catalog.

Two front doors meet Open WebUI users: the gateway, when Open WebUI's OpenAI connection
points at QuotaGate with a key marked ``trusted_openwebui`` and forwards
``X-OpenWebUI-User-*`` headers (``ENABLE_FORWARD_USER_INFO_HEADERS=true``), and the
engine API the Filter Function and the Pipelines filter call. Both name a person by
Open WebUI's user id and role; this module maps the role (``openwebui_roles``), creates
the user on first sight and, by configuration, keeps role, email, name and groups in step
with Open WebUI — except what an admin set in QuotaGate (a pinned role, their
memberships). Identical answers are remembered for a minute, so a steady stream of
requests costs one dictionary lookup each, not a catalog write.

Background tasks (title, tags and follow-up generation) reach the upstream as ordinary
chat completions. Open WebUI marks them only when the connection carries a header whose
value is the ``{{TASK}}`` template (Admin → Connections → Headers, or ``OPENAI_API_CONFIGS``):
``{"X-OpenWebUI-Task": "{{TASK}}"}`` sends ``title_generation``, ``tags_generation``,
``follow_up_generation`` ... for tasks and an empty value for chats. Only Open WebUI sets
it (clients cannot reach the upstream's headers), so a task can be charged to the
connection key's own user instead of the person when ``openwebui_tasks = "key"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from quotagate.config import Settings
from quotagate.core.errors import InvalidInput, StoreUnavailable
from quotagate.core.policy import User
from quotagate.core.text import MAX_NAME, check_name, printable
from quotagate.engine import Engine
from quotagate.gateway.errors import ApiError, store_unavailable
from quotagate.store.catalog import ApiKey

USER_ID = b"x-openwebui-user-id"
USER_EMAIL = b"x-openwebui-user-email"
USER_NAME = b"x-openwebui-user-name"
USER_ROLE = b"x-openwebui-user-role"
MAX_REMEMBERED = 50_000


@dataclass(frozen=True)
class Person:
    """An Open WebUI user as Open WebUI describes them (role not yet mapped)."""

    id: str
    role: str | None = None
    email: str | None = None
    name: str | None = None
    groups: tuple[str, ...] | None = None


def invalid_user(what: str) -> ApiError:
    return ApiError(400, f"{what} is not a valid user id.", "invalid_request_error", "invalid_user")


def check_user_id(value: str, what: str = "The Open WebUI user id") -> str:
    """The id, stripped; a 400 naming `what` if it is no valid QuotaGate name (empty, too
    long, with '|' or a control character, which would forge a log line)."""
    value = value.strip()
    try:
        return check_name(value, what)
    except InvalidInput:
        raise invalid_user(what) from None


def clean_groups(groups: Sequence[str]) -> tuple[str, ...]:
    """Open WebUI group names as QuotaGate group names ('|' is reserved, control
    characters are dropped, 255 characters at most)."""
    found = set()
    for name in groups:
        if isinstance(name, str):
            cleaned = printable(name).strip().replace("|", "/")[:MAX_NAME].strip()
            if cleaned:
                found.add(cleaned)
    return tuple(sorted(found))


def forwarded_person(headers: dict[bytes, bytes]) -> Person | None:
    """The person of Open WebUI's forwarded headers, or None when there are none."""
    raw = headers.get(USER_ID)
    if not raw:
        return None
    user = check_user_id(raw.decode("utf-8", "replace"), "The X-OpenWebUI-User-Id header")

    def text(name: bytes, quoted: bool = False) -> str | None:
        value = headers.get(name)
        if not value:
            return None
        decoded = value.decode("utf-8", "replace").strip()
        # Open WebUI sends the name URL-quoted (urllib.parse.quote(name, safe=" "))
        return printable(unquote(decoded) if quoted else decoded) or None

    return Person(user, text(USER_ROLE), text(USER_EMAIL), text(USER_NAME, quoted=True))


class OpenWebUIUsers:
    """Maps Open WebUI people to QuotaGate users and keeps the catalog in step."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        remember: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.remember = settings.openwebui_cache_seconds if remember is None else remember
        self.monotonic = monotonic
        self._task_header = settings.openwebui_task_header.lower().encode("latin-1")
        # person id -> (what Open WebUI said, until when it is trusted, their role)
        self._seen: dict[str, tuple[tuple[object, ...], float, str]] = {}

    def role_for(self, openwebui_role: str | None) -> str:
        """The QuotaGate role of an Open WebUI role (`openwebui_roles`, else the default)."""
        if openwebui_role:
            mapped = self.settings.openwebui_roles.get(openwebui_role)
            if mapped:
                return mapped
        return self.settings.openwebui_default_role

    async def sync(self, person: Person) -> str:
        """Make sure the catalog knows `person` as configured; returns their QuotaGate role.

        What an admin set in QuotaGate wins over what Open WebUI says: a role given with
        `users set-role` is pinned, and Open WebUI's groups are added to the admin's
        memberships instead of replacing them (:meth:`Catalog.sync_user`). The catalog
        write runs through :attr:`Engine.catalog_call`, off the event loop.
        """
        mapped = self.role_for(person.role)
        groups = person.groups if self.settings.openwebui_groups == "sync" else None
        wanted = (mapped, person.role is not None, person.email, person.name, groups)
        now = self.monotonic()
        seen = self._seen.get(person.id)
        if seen is not None and seen[0] == wanted and seen[1] > now:
            return seen[2]
        catalog = self.engine.catalog
        known = catalog.user(person.id)
        follow = self.settings.openwebui_sync_roles and person.role is not None
        if (
            known is None
            or (follow and not known.role_pinned and known.role != mapped)
            or (person.email and person.email != known.email)
            or (person.name and person.name != known.name)
            or (groups is not None and not known.in_step_with(groups))
        ):
            synced: tuple[User, bool] = await self.engine.catalog_call(
                catalog.sync_user,
                person.id,
                mapped,
                follow_role=follow,
                email=person.email,
                name=person.name,
                groups=groups,
            )
            known, changed = synced
            if changed:
                self.engine.refresh()  # the next admit must see the new role or groups
        if len(self._seen) >= MAX_REMEMBERED:
            self._seen.clear()
        self._seen[person.id] = (wanted, now + self.remember, known.role)
        return known.role

    def task(self, headers: dict[bytes, bytes]) -> str | None:
        """The Open WebUI task a request performs (from the ``{{TASK}}`` header), if any."""
        value = headers.get(self._task_header)
        if not value:
            return None
        return value.decode("latin-1").strip() or None

    async def charged(self, key: ApiKey, headers: dict[bytes, bytes]) -> tuple[str, str | None]:
        """(user id, role for a first-seen user) a gateway request is charged to.

        Only a key marked ``trusted_openwebui`` may name someone else; without forwarded
        headers (or for an exempted task) the key's own user pays. A person whose catalog
        write cannot reach the store within `store_timeout` is the same 503
        ``store_unavailable`` as any request that cannot (the quota API says it itself).
        """
        if not key.trusted_openwebui:
            return key.user_id, None
        person = forwarded_person(headers)
        if person is None:
            return key.user_id, None
        if self.settings.openwebui_tasks == "key" and self.task(headers):
            return key.user_id, None
        try:
            return person.id, await self.sync(person)
        except StoreUnavailable as exc:
            raise store_unavailable(exc, self.settings.store_timeout) from None
