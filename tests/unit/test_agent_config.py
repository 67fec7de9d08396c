"""The agent config (natfail/agent/config.py): a good file, one broken file per
rule with the key and the line it must name, every problem at once from
check_agent_file, and fuzzing that only Problems and ConfigError come out."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natfail.agent.config import (
    AGENT_KEYS,
    DEFAULT_AGENT_CONFIG,
    AgentConfig,
    check_agent_file,
    check_agent_text,
    load_agent_config,
    parse_agent_config,
)
from natfail.config import ConfigError, Endpoint, Problem, decode_key

G1 = "Jv/oyEFlS3x11ruFAZ5JLS+w5QZ7Aa+4rUAgv+XPVSs="
G2 = "StqbyRjILJ4/YcVO8Wo11kXUcvIpOnDzKotuDWUr4nM="
PATH = Path("/etc/natfail/agent.toml")

GOOD = f"""\
# natfail agent on backend a
listen = "10.0.0.2:51821"
gateways = [
    "{G1}",  # gateway 1
    "{G2}",
]
interfaces = ["wg0", "wg1"]
"""


def problems(text: str) -> list[tuple[str, str, int | None]]:
    return [(p.key, p.message, p.line) for p in check_agent_text(text, PATH)]


def only(text: str) -> Problem:
    found = check_agent_text(text, PATH)
    assert len(found) == 1, found
    return found[0]


def with_line(line_number: int | tuple[int, int], new: str, base: str = GOOD) -> str:
    """``base`` with one line replaced, or lines first..last (the rest commented out)."""
    first, last = line_number if isinstance(line_number, tuple) else (line_number, line_number)
    lines = base.split("\n")
    lines[first - 1 : last] = [new] + ["#"] * (last - first)
    return "\n".join(lines)


def test_the_good_config() -> None:
    config = parse_agent_config(GOOD, PATH)
    assert config == AgentConfig(
        listen=Endpoint(ipaddress.IPv4Address("10.0.0.2"), 51821),
        gateways=(decode_key(G1), decode_key(G2)),
        interfaces=("wg0", "wg1"),
    )
    assert check_agent_text(GOOD, PATH) == []
    assert DEFAULT_AGENT_CONFIG == "/etc/natfail/agent.toml"
    assert AGENT_KEYS == ("listen", "gateways", "interfaces")


def test_ipv6_listen_and_the_longest_interface_name() -> None:
    text = f'listen = "[2001:db8::2]:51821"\ngateways = ["{G1}"]\ninterfaces = ["{"w" * 15}"]\n'
    config = parse_agent_config(text, PATH)
    assert str(config.listen) == "[2001:db8::2]:51821"
    assert config.interfaces == ("w" * 15,)


def test_load_and_check_a_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD)
    assert load_agent_config(path) == parse_agent_config(GOOD, path)
    assert load_agent_config(str(path)) == parse_agent_config(GOOD, path)
    assert check_agent_file(path) == []


# --- one rule at a time: (line to replace, new text, key, message part, line) ---------------

CASES = [
    # unknown keys
    (1, 'listn = "10.0.0.2:51821"', "listn", "unknown key 'listn' (did you mean 'listen'?)", 1),
    (1, "extra = 1", "extra", "unknown key 'extra' (known keys: listen, gateways, interfaces)", 1),
    # listen
    (2, "listen = 51821", "listen", "must be a string, not an integer", 2),
    (2, 'listen = "10.0.0.2"', "listen", "missing ':port'", 2),
    (2, 'listen = "agent.example:51821"', "listen", "is a hostname; give an IP address", 2),
    (2, 'listen = "2001:db8::2:51821"', "listen", "an IPv6 address needs brackets", 2),
    (2, 'listen = "[2001:db8::2]"', "listen", "missing ':port'", 2),
    (2, 'listen = "10.0.0.2:0"', "listen", "the port must be a number from 1 to 65535", 2),
    (2, 'listen = "10.0.0.2:65536"', "listen", "the port must be a number from 1 to 65535", 2),
    (2, 'listen = "10.0.0.300:51821"', "listen", "is not an IPv4 address", 2),
    (2, 'listen = "0.0.0.0:51821"', "listen", "the agent listens on one address, not on all", 2),
    (2, 'listen = "[::]:51821"', "listen", "the agent listens on one address, not on all", 2),
    (2, 'listen = "224.0.0.1:51821"', "listen", "must be a unicast address", 2),
    (2, 'listen = "[fe80::1%eth0]:51821"', "listen", "scope id", 2),
    # gateways
    ((3, 6), 'gateways = "x"', "gateways", "must be an array of strings, not a string", 3),
    ((3, 6), "gateways = []", "gateways", "must not be empty", 3),
    (4, "    42,", "gateways[0]", "must be a string (a public key), not an integer", 4),
    (4, '    "not base64!",', "gateways[0]", "is not valid base64", 4),
    (5, f'    "{G1[:-4]}",', "gateways[1]", "decodes to 30 bytes; a WireGuard key is 32 bytes", 5),
    (5, f'    "{G1}",', "gateways[1]", "duplicate of gateways[0]; list each once", 5),
    # interfaces
    (7, 'interfaces = "wg0"', "interfaces", "must be an array of strings, not a string", 7),
    (7, "interfaces = []", "interfaces", "must not be empty", 7),
    (7, 'interfaces = ["wg0", 1]', "interfaces[1]", "must be a string, not an integer", 7),
    (7, 'interfaces = ["wg0", ""]', "interfaces[1]", "'' is not a valid interface name", 7),
    (7, f'interfaces = ["{"w" * 16}"]', "interfaces[0]", "is not a valid interface name", 7),
    (7, 'interfaces = ["wg/0"]', "interfaces[0]", "(1 to 15 bytes, no '/', ':' or whitespace)", 7),
    (7, 'interfaces = ["wg 0"]', "interfaces[0]", "is not a valid interface name", 7),
    (7, 'interfaces = ["wg\\t0"]', "interfaces[0]", "is not a valid interface name", 7),
    (7, 'interfaces = ["wg:0"]', "interfaces[0]", "is not a valid interface name", 7),
    (7, 'interfaces = [".."]', "interfaces[0]", "is not a valid interface name", 7),
    (7, 'interfaces = ["éééééééé"]', "interfaces[0]", "is not a valid interface name", 7),
    (7, 'interfaces = ["wg0", "wg1", "wg0"]', "interfaces[2]", "duplicate of interfaces[0]", 7),
]


@pytest.mark.parametrize(("number", "new", "key", "message", "line"), CASES)
def test_each_rule_names_the_key_and_the_line(
    number: int | tuple[int, int], new: str, key: str, message: str, line: int
) -> None:
    problem = only(with_line(number, new))
    assert (problem.path, problem.key, problem.line) == (PATH, key, line)
    assert message in problem.message
    assert str(problem) == f"{PATH}: {key}: {problem.message} (line {line})"
    with pytest.raises(ConfigError) as caught:
        parse_agent_config(with_line(number, new), PATH)
    assert caught.value.problem == problem


@pytest.mark.parametrize(
    ("number", "key", "message"),
    [
        (2, "listen", 'missing (required): the address gateways reach the agent at, "IP:port"'),
        (7, "interfaces", "missing (required): the WireGuard interfaces this agent serves"),
    ],
)
def test_a_missing_key_has_no_line(number: int, key: str, message: str) -> None:
    problem = only(with_line(number, ""))
    assert (problem.key, problem.message, problem.line) == (key, message, None)


def test_missing_gateways() -> None:
    text = 'listen = "10.0.0.2:51821"\ninterfaces = ["wg0"]\n'
    assert problems(text) == [
        (
            "gateways",
            "missing (required): the probe public key of each gateway this agent obeys",
            None,
        )
    ]


def test_a_table_is_an_unknown_key_at_its_header() -> None:
    problem = only(GOOD + "\n[agent]\nlisten = 1\n")
    assert (problem.key, problem.line) == ("agent", 9)
    assert problem.message.startswith("unknown key 'agent'")


def test_an_array_of_strings_that_is_a_table() -> None:
    problem = only(with_line(7, "interfaces = { a = 1 }"))
    assert (problem.key, problem.message) == (
        "interfaces",
        "must be an array of strings, not a table",
    )


def test_every_problem_at_once_in_file_order(tmp_path: Path) -> None:
    text = f"""\
listen = "0.0.0.0:1"
gatways = 1
gateways = [
  "{G1}",
  "nope",   # a comment, with "quotes" and a ] bracket
  '{G1}',
  3,
]
interfaces = ["wg0", "wg/1", "wg0"]
"""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    found = check_agent_file(path)
    assert [(p.key, p.line) for p in found] == [
        ("listen", 1),
        ("gatways", 2),
        ("gateways[1]", 5),
        ("gateways[2]", 6),
        ("gateways[3]", 7),
        ("interfaces[1]", 9),
        ("interfaces[2]", 9),
    ]
    assert all("\n" not in str(p) and str(p).startswith(f"{path}: ") for p in found)
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path)
    assert caught.value.problem == found[0]


def test_missing_keys_come_after_the_ones_with_a_line() -> None:
    assert [(k, line) for k, _, line in problems('gateways = ["x"]\nbad = 1\n')] == [
        ("gateways[0]", 1),
        ("bad", 2),
        ("listen", None),
        ("interfaces", None),
    ]


@pytest.mark.parametrize(
    ("array", "lines"),
    [
        ('["a", "b", 1]', [1, 1, 1]),
        ('[\n"a",\n\n"b"  ,  # x, y\n  1\n]', [2, 4, 5]),
        ('[ \'a,b\', "c]" ,\n """d\n,e""", 4 ]', [1, 1, 2, 3]),
        ('[\n  [1, 2],\n  {x = "y,"},\n  5]', [2, 3, 4]),
        ('[ "a\\"b,", # "\n  2 ]', [1, 2]),
    ],
)
def test_the_line_of_each_array_item(array: str, lines: list[int]) -> None:
    text = f"# head\ngateways = {array}\n"
    found = [p for p in check_agent_text(text, PATH) if p.key.startswith("gateways[")]
    assert [p.line for p in found] == [line + 1 for line in lines]


# --- files that cannot be read -------------------------------------------------------------


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "none.toml"
    (problem,) = check_agent_file(path)
    assert str(problem) == f"{path}: cannot read the config file: No such file or directory"
    with pytest.raises(ConfigError):
        load_agent_config(path)


def test_a_directory(tmp_path: Path) -> None:
    (problem,) = check_agent_file(tmp_path)
    assert problem.message == "cannot read the config file: it is not a regular file"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'listen = "10.0.0.2:1"\n# \xff\n')
    (problem,) = check_agent_file(path)
    assert (problem.key, problem.message, problem.line) == ("", "is not valid UTF-8", 2)


def test_a_syntax_error_is_the_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD + "listen = \n")
    (problem,) = check_agent_file(path)
    assert problem.message.startswith("TOML syntax error")
    assert problem.line == 8


def test_a_fifo_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "fifo.toml"
    os.mkfifo(path)
    (problem,) = check_agent_file(path)
    assert "not a regular file" in problem.message


# --- fuzzing -------------------------------------------------------------------------------

_LINES = st.sampled_from(
    [
        'listen = "10.0.0.2:51821"',
        'listen = "[::1]:5"',
        "listen = 5",
        f'gateways = ["{G1}"]',
        f'gateways = ["{G1}", "{G1}"]',
        "gateways = [",
        f'  "{G2}",',
        "  1,",
        "]",
        'interfaces = ["wg0"]',
        'interfaces = ["wg0", "", "a/b"]',
        "[agent]",
        "[[gateways]]",
        'x = """',
        "# comment",
        "",
        "= =",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINES, max_size=12))
def test_random_documents_only_give_problems(lines: list[str]) -> None:
    text = "\n".join(lines)
    found = check_agent_text(text, PATH)
    for problem in found:
        assert isinstance(problem, Problem) and "\n" not in str(problem)
        if problem.line is not None:
            assert 1 <= problem.line <= text.count("\n") + 1
    try:
        config = parse_agent_config(text, PATH)
    except ConfigError as exc:
        assert found and exc.problem == found[0]
    else:
        assert found == [] and config.gateways and config.interfaces


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_only_gives_problems(text: str) -> None:
    for problem in check_agent_text(text, PATH):
        assert "\n" not in str(problem)
