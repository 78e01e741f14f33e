"""The production compose file (deploy/compose.yaml) as the tests read it: services, their
environment, mounts, and compose's ${VAR} interpolation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
# Host paths compose mounts that the operator makes on the installation; never in the repo.
OPERATOR_PROVIDED = {
    "certs": "the broker's TLS certificate, key and CA: each installation's own, and a private "
    "key is never committed",
    "mqtt-users": "the broker's password file, made with mosquitto_passwd on the installation "
    "(one user per gateway, plus the services)",
}
# Names of variables that hold secrets
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY\b")
INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[?\-])(?P<arg>[^}]*))?\}"
)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with ``values`` as the .env."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        value = values.get(name, "")
        if op and op.endswith("?") and not value:
            raise LookupError(f"{name}: {arg}")
        return value if value or not op or not op.endswith("-") else arg

    return INTERPOLATION.sub(one, text)


def references() -> list[re.Match[str]]:
    """Every ${...} in the compose file's values (comments are not interpolated)."""
    return [m for text in strings(compose()) for m in INTERPOLATION.finditer(text)]


def dummy_env() -> dict[str, str]:
    """A value for every required variable (the rest keep their defaults), as in a .env."""
    names = {m["name"] for m in references() if m["op"] == ":?"}
    return {name: f"test-{name.lower()}-0123456789" for name in names}


def strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, source, target) of each volume: kind is "bind" or "volume"."""
    found = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
            kind = "bind" if source.startswith((".", "/")) else "volume"
        else:
            kind, source, target = entry["type"], entry["source"], entry["target"]
        found.append((kind, source, target))
    return found


def host_path(source: str) -> Path:
    return (DEPLOY / source).resolve()


def operator_provided(source: str) -> bool:
    return host_path(source).relative_to(DEPLOY).parts[0] in OPERATOR_PROVIDED
