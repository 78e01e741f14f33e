"""Who may do what on the hotline: users with one role each, argon2 password hashes, bearer
tokens (stored only as their sha256), and an audit log of every change.

The roles come from the utility's hotline (DOMAIN.md): call-takers take calls and own what
they take; dispatchers run the queue and send crews; technicians work on site (and are the
only ones who may reopen a valve, because that needs a person there); engineers read; admins
manage users and the published service times.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES = ("dispatcher", "call_taker", "engineer", "technician", "admin")

_ALL = frozenset(ROLES)
PERMISSIONS: dict[str, frozenset[str]] = {
    "tickets.read": _ALL,
    "tickets.create": frozenset({"call_taker", "dispatcher", "admin"}),
    "tickets.note": frozenset({"call_taker", "dispatcher", "technician", "admin"}),
    # call-takers answer queries and complaints on their own: they may move tickets they own
    "tickets.acknowledge": frozenset({"dispatcher", "call_taker", "admin"}),
    "tickets.dispatch": frozenset({"dispatcher", "admin"}),
    "tickets.on_site": frozenset({"dispatcher", "technician", "admin"}),
    "tickets.resolve": frozenset({"dispatcher", "technician", "call_taker", "admin"}),
    "tickets.close": frozenset({"dispatcher", "call_taker", "admin"}),
    "tickets.cancel": frozenset({"dispatcher", "admin"}),
    "valve.close": frozenset({"dispatcher", "technician", "admin"}),
    "valve.open": frozenset({"technician"}),  # only the technician on site: never remotely
    "households.read": _ALL,
    "silences.manage": frozenset({"technician", "admin"}),
    "reports.read": _ALL,
    "users.manage": frozenset({"admin"}),
    "service_times.manage": frozenset({"admin"}),
    "audit.read": frozenset({"admin"}),
    "webhook.read": frozenset({"admin", "engineer"}),
}
# the roles that may move only the tickets they own
OWN_TICKETS_ONLY = frozenset({"call_taker"})

_hasher = PasswordHasher()
# verified against when the user does not exist, so a wrong name costs as long as a wrong password
_DUMMY_HASH = _hasher.hash("gasguard-no-such-user")


@dataclass(frozen=True)
class User:
    username: str
    display_name: str
    role: str

    def may(self, permission: str) -> bool:
        return self.role in PERMISSIONS[permission]


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def add_user(
    cur: psycopg.AsyncCursor[Any], username: str, display_name: str, role: str, password: str
) -> None:
    """Create a user, or replace the role, name and password of an existing one."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if len(password) < 8:
        raise ValueError("a password needs at least 8 characters")
    await cur.execute(
        "INSERT INTO users (username, display_name, role, password_hash) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (username) DO UPDATE SET display_name = excluded.display_name, "
        "role = excluded.role, password_hash = excluded.password_hash, active = true",
        (username, display_name, role, hash_password(password)),
    )


async def login(
    cur: psycopg.AsyncCursor[Any], username: str, password: str, hours: float
) -> tuple[str, User, datetime] | None:
    """A new bearer token for a right username and password, else None."""
    await cur.execute(
        "SELECT password_hash, display_name, role FROM users WHERE username = %s AND active",
        (username,),
    )
    row = await cur.fetchone()
    if row is None:
        check_password(_DUMMY_HASH, password)
        return None
    if not check_password(row[0], password):
        return None
    token = secrets.token_urlsafe(32)
    await cur.execute(
        "INSERT INTO api_tokens (token_sha256, username, expires_at) "
        "VALUES (%s, %s, now() + %s) RETURNING expires_at",
        (_token_digest(token), username, timedelta(hours=hours)),
    )
    expires = await cur.fetchone()
    assert expires is not None
    return token, User(username, row[1], row[2]), expires[0]


async def user_for_token(cur: psycopg.AsyncCursor[Any], token: str) -> User | None:
    await cur.execute(
        "SELECT u.username, u.display_name, u.role FROM api_tokens t "
        "JOIN users u ON u.username = t.username "
        "WHERE t.token_sha256 = %s AND t.revoked_at IS NULL AND t.expires_at > now() "
        "AND u.active",
        (_token_digest(token),),
    )
    row = await cur.fetchone()
    return None if row is None else User(row[0], row[1], row[2])


async def revoke(cur: psycopg.AsyncCursor[Any], token: str) -> None:
    await cur.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE token_sha256 = %s AND revoked_at IS NULL",
        (_token_digest(token),),
    )


async def audit(
    cur: psycopg.AsyncCursor[Any],
    actor: str,
    action: str,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record a change: who, what, on which thing (``when`` is the row's default)."""
    await cur.execute(
        "INSERT INTO audit_log (actor, action, target, detail) VALUES (%s, %s, %s, %s)",
        (actor, action, target, orjson.dumps(detail or {}).decode()),
    )
