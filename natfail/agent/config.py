"""The agent's config, ``/etc/natfail/agent.toml``, as the contract fixes it::

    listen = "10.0.0.2:51821"        # where gateways reach the agent
    gateways = ["probe public key of each gateway allowed to command it"]
    interfaces = ["wg0"]             # the WireGuard interfaces it serves

checked as strictly as the gateway's, with its machinery (:mod:`natfail.config`):
every problem a :class:`~natfail.config.problems.Problem` naming the file, the
key (``gateways[1]``) and the line; unknown keys refused with a "did you mean";
:func:`check_agent_file` reports every problem, :func:`load_agent_config` raises
the first (in file order) as a :class:`~natfail.config.problems.ConfigError`.

Rules beyond the types, and why:

* ``listen`` is an IP literal and a port, one address, not ``0.0.0.0``: the
  agent takes commands that steer WireGuard, and must listen only where the
  operator said (no DNS either: the agent must start without a resolver).
* ``gateways`` lists base64 WireGuard public keys (the gateways' probe keys),
  at least one, each once: an agent that obeys nobody is a mistake.
* ``interfaces`` are names the kernel would take (``dev_valid_name``: under 16
  bytes, no '/', ':' or whitespace, not '.' or '..'), at least one, each once;
  the name also becomes a path, ``/var/run/wireguard/NAME.sock``.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from natfail.config.keys import decode_key
from natfail.config.lines import line_of
from natfail.config.problems import ConfigError, Invalid, Problem, Where, render
from natfail.config.reader import _syntax_error, read_config_file
from natfail.config.schema import IFNAMSIZ
from natfail.config.tables import _unknown_key
from natfail.core.model import Endpoint, kind, show, split_host_port
from natfail.tomlshim import tomllib

DEFAULT_AGENT_CONFIG: Final = "/etc/natfail/agent.toml"
AGENT_KEYS: Final = ("listen", "gateways", "interfaces")
_MISSING: Final = object()


@dataclass(frozen=True)
class AgentConfig:
    listen: Endpoint
    gateways: tuple[bytes, ...]  # the probe public keys it obeys, 32 raw bytes each
    interfaces: tuple[str, ...]


def interface_name_problem(name: str) -> str | None:
    """Why the kernel would refuse ``name`` as an interface name, or None."""
    size = len(name.encode("utf-8", "surrogatepass"))
    bad = any(ch in "/:" or ch.isspace() or not ch.isprintable() for ch in name)
    if not 0 < size < IFNAMSIZ or bad or name in (".", ".."):
        return (
            f"{show(name)} is not a valid interface name "
            f"(1 to {IFNAMSIZ - 1} bytes, no '/', ':' or whitespace)"
        )
    return None


# --- the rules ---------------------------------------------------------------------------


def _listen(value: object) -> Endpoint:
    where: Where = ("listen",)
    if value is _MISSING:
        raise Invalid(
            where, 'missing (required): the address gateways reach the agent at, "IP:port"'
        )
    if not isinstance(value, str):
        raise Invalid(where, f"must be a string, not {kind(value)}")
    try:
        return Endpoint.parse(value)
    except ValueError as exc:
        message = str(exc)
    try:
        unspecified = ipaddress.ip_address(split_host_port(value)[0]).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified:
        message = (
            f"{show(value)}: the agent listens on one address, not on all "
            "(give the one gateways reach it at)"
        )
    raise Invalid(where, message)


def _gateway(value: object, index: int) -> bytes:
    if not isinstance(value, str):
        raise Invalid(("gateways", index), f"must be a string (a public key), not {kind(value)}")
    try:
        return decode_key(value)
    except ValueError as exc:
        raise Invalid(("gateways", index), str(exc)) from None


def _interface(value: object, index: int) -> str:
    if not isinstance(value, str):
        raise Invalid(("interfaces", index), f"must be a string, not {kind(value)}")
    problem = interface_name_problem(value)
    if problem is not None:
        raise Invalid(("interfaces", index), problem)
    return value


_WHAT: Final = {
    "gateways": "the probe public key of each gateway this agent obeys",
    "interfaces": "the WireGuard interfaces this agent serves",
}


def _array(data: Mapping[str, object], key: str) -> list[object]:
    value = data.get(key, _MISSING)
    if value is _MISSING:
        raise Invalid((key,), f"missing (required): {_WHAT[key]}")
    if not isinstance(value, list):
        raise Invalid((key,), f"must be an array of strings, not {kind(value)}")
    if not value:
        raise Invalid((key,), f"must not be empty: list {_WHAT[key]}")
    return value


def _validate(data: Mapping[str, object]) -> tuple[AgentConfig | None, list[Invalid]]:
    """The config, or None, and every problem (validation order)."""
    found: list[Invalid] = []
    for key in data:
        if key not in AGENT_KEYS:
            found.append(Invalid((str(key),), _unknown_key(str(key), AGENT_KEYS)))

    listen: Endpoint | None = None
    try:
        listen = _listen(data.get("listen", _MISSING))
    except Invalid as exc:
        found.append(exc)

    lists: dict[str, list[object]] = {}
    for key, parse in (("gateways", _gateway), ("interfaces", _interface)):
        try:
            items = _array(data, key)
        except Invalid as exc:
            found.append(exc)
            continue
        values: list[object] = []
        first: dict[object, int] = {}
        for index, item in enumerate(items):
            try:
                value = parse(item, index)
            except Invalid as exc:
                found.append(exc)
                continue
            if value in first:
                found.append(
                    Invalid((key, index), f"duplicate of {key}[{first[value]}]; list each once")
                )
                continue
            first[value] = index
            values.append(value)
        lists[key] = values

    if found or listen is None:
        return None, found
    gateways = tuple(v for v in lists["gateways"] if isinstance(v, bytes))
    interfaces = tuple(v for v in lists["interfaces"] if isinstance(v, str))
    return AgentConfig(listen, gateways, interfaces), []


# --- line numbers of array items -----------------------------------------------------------


def _item_lines(source: str, key_line: int) -> list[int]:
    """The line each item of the array assigned on ``key_line`` starts on, by a
    rough scan (strings, comments, nesting); [] when the scan gets lost."""
    lines = source.split("\n")
    text = "\n".join(lines[key_line - 1 :])
    start = text.find("=")
    start = text.find("[", start + 1) if start >= 0 else -1
    if start < 0:
        return []
    starts: list[int] = []
    line = key_line + text.count("\n", 0, start)
    depth, expecting, i = 0, True, start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\n":
            line += 1
        elif ch == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        elif depth == 0 and ch == "]":
            return starts
        elif ch in " \t\r":
            pass
        elif depth == 0 and ch == ",":
            expecting = True
        else:
            if expecting and depth == 0:
                starts.append(line)
                expecting = False
            if ch in "\"'":
                end = _string_end(text, i)
                if end < 0:
                    return []
                line += text.count("\n", i, end)
                i = end
                continue
            if ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
        i += 1
    return []


def _string_end(text: str, i: int) -> int:
    """The index after the TOML string that starts at ``i``, or -1."""
    quote = text[i]
    if text.startswith(quote * 3, i):
        end = text.find(quote * 3, i + 3)
        return -1 if end < 0 else end + 3
    j = i + 1
    while j < len(text) and text[j] not in (quote, "\n"):
        j += 2 if quote == '"' and text[j] == "\\" else 1
    return j + 1 if j < len(text) and text[j] == quote else -1


def _line(source: str, where: Where) -> int | None:
    line = line_of(source, where)
    if line is None or len(where) != 2 or not isinstance(where[1], int):
        return line
    try:
        starts = _item_lines(source, line)
    except Exception:  # a helper for messages must never hide the real problem
        return line
    return starts[where[1]] if where[1] < len(starts) else line


# --- entry points --------------------------------------------------------------------------


def _document(text: str, path: Path) -> dict[str, object]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, exc, text) from None
    except RecursionError:
        raise ConfigError(path, "", "TOML syntax error: nested too deeply") from None
    except ValueError as exc:
        raise ConfigError(path, "", f"TOML value error: {exc}") from None


def _check(text: str, path: Path) -> tuple[AgentConfig | None, list[Problem]]:
    config, found = _validate(_document(text, path))
    problems = [
        Problem(path, render(exc.where), exc.message, _line(text, exc.where)) for exc in found
    ]
    # file order; problems without a line (a missing key) last, in validation order
    problems.sort(key=lambda p: p.line if p.line is not None else sys.maxsize)
    return config, problems


def _read(path: Path) -> str:
    raw = read_config_file(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(path, "", "is not valid UTF-8", line) from None


def check_agent_text(text: str, path: Path | str) -> list[Problem]:
    """Every problem of an agent config's text, one line each; [] when it is good."""
    path = Path(path)
    try:
        return _check(text, path)[1]
    except ConfigError as exc:
        return [exc.problem]


def parse_agent_config(text: str, path: Path | str) -> AgentConfig:
    """The config of an agent config's text; ConfigError with the first problem."""
    path = Path(path)
    config, problems = _check(text, path)
    if problems or config is None:
        raise problems[0].error()
    return config


def check_agent_file(path: Path | str = DEFAULT_AGENT_CONFIG) -> list[Problem]:
    """Every problem of an agent config file, one line each, like the gateway's
    ``check-config``: an unreadable file or a TOML syntax error is the one
    problem; otherwise each bad key and each bad array item."""
    path = Path(path)
    try:
        return check_agent_text(_read(path), path)
    except ConfigError as exc:
        return [exc.problem]


def load_agent_config(path: Path | str = DEFAULT_AGENT_CONFIG) -> AgentConfig:
    """Read and check an agent config file; ConfigError with the first problem."""
    path = Path(path)
    return parse_agent_config(_read(path), path)
