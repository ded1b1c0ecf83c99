"""docker-compose.yml and the Dockerfile run real `ddm-node` commands: check them without Docker.

No Docker engine runs here, so the compose file is checked statically: compose's own variable
interpolation is emulated, every `ddm-node ...` command is pulled out of `command:` lists and
`sh -c` scripts (split on newlines, `;`, `&&`, `||`, `|`; `$(...)` and shell variables replaced by
plausible values), and each one is parsed by the real `ddm_node.cli.build_parser()`. The shell
snippets that feed those commands (peer id from the announce file, run id from the plan) are run
on sample files, so a broken snippet fails here too.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
import yaml

from ddm_node.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Values compose would read from the environment or .env. Empty: every variable the compose file
# uses must carry a default, so a bare `docker compose up` works.
COMPOSE_ENV: dict[str, str] = {}

# A syntactically valid libp2p peer id and run id, for values the container computes at run time.
PEER_ID = "12D3KooWQkeQTmYJoQ1PLcUrL1VJuRM7WSSNFZH9CfgGARWC3sBx"
RUN_ID = hashlib.sha256(b"placeholder plan").hexdigest()
HOST_IP = "172.18.0.9"  # a container's address on the compose network
SUBSTITUTION_PLACEHOLDERS = {"PEER_ID": PEER_ID, "RUN_ID": RUN_ID, "HOST_IP": HOST_IP}
GENERIC_PLACEHOLDER = "placeholder"
CONTAINER_ENV = {"HOME": "/home/ddm", "PATH": "/usr/local/bin:/usr/bin:/bin"}

ISLANDS = ["island1", "island2", "island3", "island4"]
DHT_PORT = 31337
GRPC_PORT = 50051
LOOPBACK = ("127.0.0.1", "localhost", "/ip6/::1/", "0.0.0.0")


# ----------------------------------------------------------------------------- compose interpolation

_COMPOSE_VAR = re.compile(r"\$(?:(?P<escaped>\$)|(?P<named>[_a-zA-Z][_a-zA-Z0-9]*)|\{(?P<braced>[^}]*)\}|(?P<invalid>))")
_BRACED = re.compile(r"^(?P<name>[_a-zA-Z][_a-zA-Z0-9]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


def compose_interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `$VAR`, `${VAR:-default}` and `$$` handling; a bare `$(` is an error, as in compose."""

    def one(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("invalid") is not None:
            raise AssertionError(f"invalid interpolation (write $$ for a literal $): {text[m.start():m.start() + 20]!r}")
        spec = m.group("named") or m.group("braced")
        b = _BRACED.match(spec)
        if not b:
            raise AssertionError(f"invalid interpolation ${{{spec}}}")
        name, op, arg = b.group("name"), b.group("op"), b.group("arg")
        value = env.get(name)
        if op in (":-", "-"):
            return arg if value is None or (op == ":-" and value == "") else value
        if op in (":+", "+"):
            return arg if value is not None and (op == "+" or value != "") else ""
        if value is None or (op == ":?" and value == ""):
            raise AssertionError(f"compose variable {name} is not set and has no default")
        return value

    return _COMPOSE_VAR.sub(one, text)


def interpolate_tree(node, env: dict[str, str]):
    """Interpolate every string value (not keys) of a loaded compose document."""
    if isinstance(node, str):
        return compose_interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def load_compose(text: str | None = None, env: dict[str, str] | None = None) -> dict:
    doc = yaml.safe_load(COMPOSE.read_text() if text is None else text)
    return interpolate_tree(doc, COMPOSE_ENV if env is None else env)


# ----------------------------------------------------------------------------- a little POSIX sh


def _skip_single(text: str, i: int) -> int:
    """Index after the closing quote of a '...' string starting at text[i]."""
    j = text.find("'", i + 1)
    if j < 0:
        raise AssertionError(f"unterminated single quote in {text!r}")
    return j + 1


def _end_of_substitution(text: str, start: int) -> int:
    """text[start:start+2] == '$('; the index just after its matching ')'."""
    stack = ["("]
    i = start + 2
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if stack[-1] == '"':
            if text.startswith("$(", i):
                stack.append("(")
                i += 2
                continue
            if c == '"':
                stack.pop()
        else:
            if c == "'":
                i = _skip_single(text, i)
                continue
            if text.startswith("$(", i):
                stack.append("(")
                i += 2
                continue
            if c == '"' or c == "(":
                stack.append(c)
            elif c == ")":
                stack.pop()
                if not stack:
                    return i + 1
        i += 1
    raise AssertionError(f"unterminated $( in {text!r}")


def split_commands(script: str) -> list[str]:
    """Split a sh script into simple commands on newlines, ';', '&&', '||' and '|', outside quotes
    and command substitutions. Comments and line continuations are removed."""
    script = script.replace("\\\n", " ")
    parts, buf, i, in_double = [], [], 0, False
    at_word_start = True
    while i < len(script):
        c = script[i]
        if c == "\\":
            buf.append(script[i:i + 2])
            i += 2
            at_word_start = False
            continue
        if not in_double and c == "'":
            j = _skip_single(script, i)
            buf.append(script[i:j])
            i, at_word_start = j, False
            continue
        if script.startswith("$(", i):
            j = _end_of_substitution(script, i)
            buf.append(script[i:j])
            i, at_word_start = j, False
            continue
        if c == '"':
            in_double = not in_double
        elif not in_double:
            if c == "#" and at_word_start:
                while i < len(script) and script[i] != "\n":
                    i += 1
                continue
            sep = next((s for s in ("&&", "||", ";", "|", "\n") if script.startswith(s, i)), None)
            if sep:
                parts.append("".join(buf))
                buf, i, at_word_start = [], i + len(sep), True
                continue
        buf.append(c)
        at_word_start = c in " \t"
        i += 1
    if in_double:
        raise AssertionError(f"unterminated double quote in {script!r}")
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


_SHELL_VAR = re.compile(r"\$(?:\{(?P<braced>[_a-zA-Z][_a-zA-Z0-9]*)\}|(?P<named>[_a-zA-Z][_a-zA-Z0-9]*))")


def expand(segment: str, variables: dict[str, str], substitution_value, substitutions: list[str]) -> str:
    """Replace `$(...)` (by substitution_value(inner)) and `$VAR`/`${VAR}` outside single quotes.
    An undefined variable is an error: in a real shell it would silently expand to nothing."""
    out, i, in_double = [], 0, False
    while i < len(segment):
        c = segment[i]
        if c == "\\":
            out.append(segment[i:i + 2])
            i += 2
            continue
        if not in_double and c == "'":
            j = _skip_single(segment, i)
            out.append(segment[i:j])
            i = j
            continue
        if segment.startswith("$(", i):
            j = _end_of_substitution(segment, i)
            inner = segment[i + 2:j - 1]
            substitutions.append(inner)
            out.append(substitution_value(inner))
            i = j
            continue
        if c == "$":
            m = _SHELL_VAR.match(segment, i)
            if not m:
                raise AssertionError(f"unsupported shell expansion in {segment!r}")
            name = m.group("braced") or m.group("named")
            if name not in variables:
                raise AssertionError(f"shell variable ${name} is used but never set in {segment!r}")
            out.append(variables[name])
            i = m.end()
            continue
        if c == '"':
            in_double = not in_double
        out.append(c)
        i += 1
    return "".join(out)


_ASSIGNMENT = re.compile(r"^(?P<name>[_a-zA-Z][_a-zA-Z0-9]*)=(?P<value>.*)$", re.S)
_REDIRECT = re.compile(r"^\d*(>>?|<|>&)")


@dataclass
class Command:
    """One `ddm-node` invocation found in a service (argv excludes the program name)."""

    service: str
    argv: list[str]


@dataclass
class ScriptResult:
    commands: list[list[str]] = field(default_factory=list)  # ddm-node argv lists
    substitutions: dict[str, str] = field(default_factory=dict)  # variable name -> $(...) body
    inline_substitutions: list[str] = field(default_factory=list)


def run_script_statically(script: str, env: dict[str, str]) -> ScriptResult:
    """Walk a sh script command by command, tracking variable assignments, and collect the argv
    of every `ddm-node` command (redirections dropped, `exec` allowed)."""
    result = ScriptResult()
    variables = dict(CONTAINER_ENV) | env
    for segment in split_commands(script):
        a = _ASSIGNMENT.match(segment)
        if a and not re.search(r"\s", expand(a.group("value"), variables, lambda _: "x", [])):
            name, subs = a.group("name"), []
            value = expand(a.group("value"), variables,
                           lambda inner, n=name: SUBSTITUTION_PLACEHOLDERS.get(n, GENERIC_PLACEHOLDER), subs)
            words = shlex.split(value)
            variables[name] = words[0] if words else ""
            for inner in subs:
                result.substitutions[name] = inner
            continue
        words = shlex.split(expand(segment, variables, lambda _: GENERIC_PLACEHOLDER, result.inline_substitutions))
        if "ddm-node" not in words:
            continue
        words = words[words.index("ddm-node") + 1:]
        argv, skip = [], False
        for w in words:
            if skip:
                skip = False
                continue
            m = _REDIRECT.match(w)
            if m:
                skip = w == m.group(0)  # `> file`: the target is the next word
                continue
            argv.append(w)
        result.commands.append(argv)
    return result


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with comments dropped and continuations joined."""
    lines, buf = [], ""
    for raw in text.splitlines():
        if raw.strip().startswith("#") and not buf:
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        if buf.strip():
            lines.append(buf.strip())
        buf = ""
    if buf.strip():
        lines.append(buf.strip())
    out = []
    for line in lines:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def dockerfile_entrypoint(text: str) -> list[str]:
    """The last ENTRYPOINT, which must be in exec (JSON) form so signals reach ddm-node."""
    found = [args for instr, args in dockerfile_instructions(text) if instr == "ENTRYPOINT"]
    assert found, "Dockerfile has no ENTRYPOINT"
    value = json.loads(found[-1])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), "ENTRYPOINT must be a JSON list"
    return value


# ----------------------------------------------------------------------------- services -> commands


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def service_commands(name: str, service: dict, image_entrypoint: list[str]) -> tuple[list[Command], ScriptResult]:
    """Every ddm-node command a service runs: entrypoint + command, as compose combines them."""
    entrypoint = _as_list(service["entrypoint"]) if "entrypoint" in service else image_entrypoint
    argv = entrypoint + _as_list(service.get("command"))
    assert argv, f"{name}: runs nothing"
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    prog = os.path.basename(argv[0])
    if prog in ("sh", "bash", "dash"):
        flags = [a for a in argv[1:] if a.startswith("-")]
        assert any("c" in f for f in flags), f"{name}: a shell entrypoint needs -c"
        rest = [a for a in argv[1:] if not a.startswith("-")]
        assert rest, f"{name}: `sh -c` without a script"
        result = run_script_statically(rest[0], env)
    elif prog == "ddm-node":
        result = ScriptResult(commands=[argv[1:]])
    else:
        raise AssertionError(f"{name}: runs {argv[0]!r}, neither ddm-node nor a shell")
    assert result.commands, f"{name}: no ddm-node command found"
    return [Command(name, a) for a in result.commands], result


def parse(cmd: Command, parser=None):
    """Parse with the real CLI parser; any SystemExit (error, --help, --version) fails."""
    parser = parser or build_parser()
    try:
        return parser.parse_args(cmd.argv)
    except SystemExit as exc:
        raise AssertionError(f"{cmd.service}: `ddm-node {shlex.join(cmd.argv)}` does not parse (exit {exc.code})") from None


def check_peer_address(service: str, maddr: str, services: dict) -> str:
    """A container-facing DHT multiaddr: /dns4/<service>/tcp/31337/p2p/<id>; returns the service."""
    assert not any(x in maddr for x in LOOPBACK), f"{service}: {maddr} is a loopback address inside a container"
    m = re.fullmatch(r"/dns4/(?P<host>[a-z0-9-]+)/tcp/(?P<port>\d+)/p2p/(?P<id>[1-9A-HJ-NP-Za-km-z]{40,})", maddr)
    assert m, f"{service}: {maddr} is not /dns4/<service>/tcp/<port>/p2p/<peer id>"
    assert m.group("host") in services, f"{service}: {maddr} names no compose service"
    assert int(m.group("port")) == DHT_PORT, f"{service}: {maddr} does not use the DHT port {DHT_PORT}"
    return m.group("host")


def check_start(cmd: Command, args) -> None:
    """Inside a container a node must listen where other containers reach it (never loopback),
    on the fixed ports. The container's own address is preferred: the daemon announces its gRPC
    address as host:port, and "0.0.0.0:50051" is useless to a peer."""
    try:
        host = ipaddress.ip_address(args.host)
    except ValueError:
        raise AssertionError(f"{cmd.service}: start --host {args.host!r} is not an IP address") from None
    assert not host.is_loopback, f"{cmd.service}: start --host {args.host} is not reachable from other containers"
    assert args.dht_port == DHT_PORT, f"{cmd.service}: --dht-port {args.dht_port}, expected {DHT_PORT}"
    assert args.grpc_port == GRPC_PORT, f"{cmd.service}: --grpc-port {args.grpc_port}, expected {GRPC_PORT}"


def check_service(name: str, service: dict, services: dict, image_entrypoint: list[str], parser=None):
    """Extract, parse and check every command of one service; returns [(Command, Namespace)]."""
    commands, _ = service_commands(name, service, image_entrypoint)
    parsed = []
    for cmd in commands:
        args = parse(cmd, parser)
        if args.command == "start":
            check_start(cmd, args)
        for maddr in getattr(args, "initial_peers", None) or []:
            check_peer_address(name, maddr, services)
        parsed.append((cmd, args))
    return parsed


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def entrypoint() -> list[str]:
    return dockerfile_entrypoint(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def parsed(compose, entrypoint, parser) -> dict[str, list]:
    services = compose["services"]
    return {name: check_service(name, svc, services, entrypoint, parser) for name, svc in services.items()}


def by_command(parsed: dict, name: str, command: str) -> list:
    return [args for _, args in parsed[name] if args.command == command]


# ----------------------------------------------------------------------------- tests: compose


def test_every_command_parses_with_the_real_parser(parsed, parser):
    subcommands = set(next(a for a in parser._actions if a.dest == "command").choices)
    seen = {args.command for cmds in parsed.values() for _, args in cmds}
    assert seen <= subcommands
    # The pipeline a user runs, end to end, is all there.
    assert {"keygen", "partition", "start", "assemble", "sample", "eval"} <= seen


def test_roles_one_bootstrap_four_islands_one_assembler(parsed):
    bootstraps = [n for n in parsed for a in by_command(parsed, n, "start") if not a.initial_peers]
    islands = [n for n in parsed for a in by_command(parsed, n, "start") if a.initial_peers]
    assemblers = [n for n in parsed if by_command(parsed, n, "assemble")]
    assert bootstraps == ["bootstrap"]
    assert sorted(islands) == ISLANDS
    assert assemblers == ["assembler"]


def test_bootstrap_partitions_k4_digits_and_serves_the_plan(parsed):
    (part,) = by_command(parsed, "bootstrap", "partition")
    (start,) = by_command(parsed, "bootstrap", "start")
    assert part.dataset == "digits" and part.experts == 4
    assert start.plan == part.out
    assert start.announce_file and start.announce_file.startswith("/shared/")
    assert by_command(parsed, "bootstrap", "keygen")[0].out == start.identity


def test_islands_join_the_bootstraps_plan_with_their_own_keys(parsed, compose):
    (bootstrap,) = by_command(parsed, "bootstrap", "start")
    volumes = set()
    for name in ISLANDS:
        (start,) = by_command(parsed, name, "start")
        assert start.plan == bootstrap.plan or start.run_id, f"{name} joins neither the plan nor a run id"
        assert [m.split("/")[2] for m in start.initial_peers] == ["bootstrap"]
        assert by_command(parsed, name, "keygen")[0].out == start.identity
        data = [v for v in compose["services"][name]["volumes"] if v.split(":")[1] == "/data"]
        assert len(data) == 1 and start.identity.startswith("/data/") and start.work_dir.startswith("/data/")
        volumes.add(data[0].split(":")[0])
    assert len(volumes) == len(ISLANDS), "islands must not share a key/work volume"


def test_assembler_waits_assembles_then_samples_and_evaluates(parsed):
    cmds = [args.command for _, args in parsed["assembler"]]
    assert cmds.index("assemble") < cmds.index("sample") and cmds.index("assemble") < cmds.index("eval")
    (asm,) = by_command(parsed, "assembler", "assemble")
    assert asm.wait == 3600 and asm.out == "/shared/bundle" and asm.run_id == RUN_ID
    assert by_command(parsed, "assembler", "sample")[0].ensemble == asm.out
    assert by_command(parsed, "assembler", "eval")[0].ensemble == asm.out


def test_dependents_wait_for_a_healthy_bootstrap(compose, parsed):
    services = compose["services"]
    (start,) = by_command(parsed, "bootstrap", "start")
    health = services["bootstrap"]["healthcheck"]["test"]
    assert health[0] == "CMD" and start.announce_file in health, "healthcheck must test the announce file"
    for name in ISLANDS + ["assembler"]:
        assert services[name]["depends_on"]["bootstrap"]["condition"] == "service_healthy"


def test_volumes_are_declared_and_shared_paths_line_up(compose, parsed):
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            assert source in declared, f"{name}: volume {source} is not declared"
        mounts = {v.split(":")[1] for v in svc.get("volumes", [])}
        for _, args in parsed[name]:
            for attr in ("plan", "identity", "work_dir", "announce_file", "out", "ensemble"):
                path = getattr(args, attr, None)
                if path and path.startswith("/"):
                    assert any(path == m or path.startswith(m + "/") for m in mounts), \
                        f"{name}: {attr} {path} is not on a volume and is lost with the container"


def test_peer_id_and_run_id_snippets_work_on_sample_files(compose, entrypoint, tmp_path):
    """Run the `$(...)` snippets that compute PEER_ID and RUN_ID against sample shared files."""
    (start,) = [args for _, args in check_service("bootstrap", compose["services"]["bootstrap"],
                                                   compose["services"], entrypoint) if args.command == "start"]
    shared = tmp_path / "shared"
    (shared / "plan").mkdir(parents=True)
    plan_bytes = b'{"a":1}'
    (shared / "plan" / "plan.json").write_bytes(plan_bytes)
    announce = {"peer_id": PEER_ID, "grpc": "bootstrap:50051",
                "maddrs": [f"/ip4/172.18.0.2/tcp/{DHT_PORT}/p2p/{PEER_ID}", f"/ip4/127.0.0.1/tcp/{DHT_PORT}/p2p/{PEER_ID}"]}
    (shared / Path(start.announce_file).name).write_text(json.dumps(announce))
    expected = {"PEER_ID": PEER_ID, "RUN_ID": hashlib.sha256(plan_bytes).hexdigest(),
                "HOST_IP": lambda out: ipaddress.IPv4Address(out)}  # this machine's answer may be loopback
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    checked = 0
    for name in ["bootstrap"] + ISLANDS + ["assembler", "status"]:
        _, result = service_commands(name, compose["services"][name], entrypoint)
        assert not result.inline_substitutions, f"{name}: use a variable for $(...) so it is checked here"
        for var, body in result.substitutions.items():
            script = body.replace("/shared/", str(shared) + "/")
            out = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=30, env=env)
            assert out.returncode == 0, f"{name}: $({body}) failed: {out.stderr.strip()}"
            want = expected[var]
            if callable(want):
                want(out.stdout.strip())
            else:
                assert out.stdout.strip() == want, f"{name}: $({body}) gave {out.stdout!r}"
            checked += 1
    assert checked == 1 + 2 * len(ISLANDS) + 2 + 2


# ----------------------------------------------------------------------------- tests: negative cases


def _island_with(script: str) -> dict:
    return {"entrypoint": ["sh", "-ec"], "command": [script], "environment": {"DDM_THREADS": "1"}}


GOOD = ("PEER_ID=$(python -c 'print(1)')\n"
        "exec ddm-node start --plan /shared/plan --initial-peers /dns4/bootstrap/tcp/31337/p2p/$PEER_ID \\\n"
        "  --identity /data/key --work-dir /data/work --host 0.0.0.0 --dht-port 31337 --grpc-port 50051 "
        "--threads $DDM_THREADS")


def test_the_good_sample_script_passes(entrypoint, parser):
    services = {"bootstrap": {}, "island1": {}}
    ((cmd, args),) = check_service("island1", _island_with(GOOD), services, entrypoint, parser)
    assert args.initial_peers == [f"/dns4/bootstrap/tcp/31337/p2p/{PEER_ID}"] and args.threads == 1


@pytest.mark.parametrize("broken, why", [
    (GOOD.replace("ddm-node start", "ddm-node strat"), "misspelled subcommand"),
    (GOOD.replace("--dht-port", "--dht-prot"), "misspelled flag"),
    (GOOD.replace("--identity /data/key ", ""), "missing required flag"),
    (GOOD.replace("--grpc-port 50051", "--grpc-port fifty"), "bad integer"),
    (GOOD.replace("--host 0.0.0.0", "--host 127.0.0.1"), "loopback listen address"),
    (GOOD.replace("--host 0.0.0.0", "--host $HOST"), "undefined host variable"),
    (GOOD.replace("--host 0.0.0.0", "--host island1"), "host is not an address"),
    (GOOD.replace("/dns4/bootstrap/", "/ip4/127.0.0.1/"), "loopback peer"),
    (GOOD.replace("/dns4/bootstrap/", "/dns4/bootstrapp/"), "peer names no service"),
    (GOOD.replace("$PEER_ID", "$PEERID"), "undefined shell variable"),
    (GOOD.replace("--threads $DDM_THREADS", "--threads $DDM_THREADS --help"), "help exits"),
    (GOOD.replace("exec ddm-node", "exec ddmnode"), "no ddm-node command"),
])
def test_broken_commands_fail(broken, why, entrypoint, parser):
    services = {"bootstrap": {}, "island1": {}}
    with pytest.raises(AssertionError):
        check_service("island1", _island_with(broken), services, entrypoint, parser)


def test_plain_command_list_without_shell_is_checked_too(entrypoint, parser):
    ok = {"command": ["keygen", "--out", "/data/key"]}
    assert check_service("x", ok, {}, entrypoint, parser)[0][1].command == "keygen"
    with pytest.raises(AssertionError):
        check_service("x", {"command": ["keygen", "--output", "/data/key"]}, {}, entrypoint, parser)


def test_compose_interpolation_rules():
    assert compose_interpolate("a $$(b) ${X:-7} ${Y}", {"Y": "y"}) == "a $(b) 7 y"
    with pytest.raises(AssertionError):
        compose_interpolate("peer $(cat id)", {})  # compose rejects a bare $(
    with pytest.raises(AssertionError):
        compose_interpolate("${UNSET}", {})
    with pytest.raises(AssertionError):
        load_compose("services:\n  a:\n    command: ['sh', '-c', 'echo $(date)']\n")


def test_splitter_respects_quotes_and_substitutions():
    script = "A=$(python -c 'print(1); print(2)') && echo \"x; y\" || b | c # comment; d\nddm-node keygen \\\n --out k"
    assert split_commands(script) == ["A=$(python -c 'print(1); print(2)')", 'echo "x; y"', "b", "c",
                                      "ddm-node keygen   --out k"]
    result = run_script_statically("ddm-node eval --ensemble /b --json > /shared/e.json 2>&1", {})
    assert result.commands == [["eval", "--ensemble", "/b", "--json"]]


# ----------------------------------------------------------------------------- tests: Dockerfile


def test_dockerfile_entrypoint_is_the_console_script(entrypoint):
    assert entrypoint == ["ddm-node"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ddm-node"] == "ddm_node.cli:main"


def test_dockerfile_cpu_torch_by_default_non_root_no_anonymous_volume():
    instrs = dockerfile_instructions(DOCKERFILE.read_text())
    assert instrs[0] == ("FROM", "python:3.11-slim")
    args = dict(a.split("=", 1) for i, a in instrs if i == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = [a for i, a in instrs if i == "RUN"]
    torch_run = next(n for n, a in enumerate(runs) if "torch==${TORCH_VERSION}" in a and "${TORCH_INDEX_URL}" in a)
    package_run = next(n for n, a in enumerate(runs) if re.search(r"pip install \.(\s|$)", a))
    assert torch_run < package_run, "torch must be installed before the package, or pip pulls a CUDA build"
    users = [a for i, a in instrs if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the container must not run as root"
    # no VOLUME: it leaks an anonymous volume for every container that does not mount /data (assembler, status)
    assert not [a for i, a in instrs if i == "VOLUME"], "VOLUME leaks anonymous volumes; mount named ones instead"
    exposed = {p for i, a in instrs if i == "EXPOSE" for p in a.split()}
    assert {str(DHT_PORT), str(GRPC_PORT)} <= exposed


def test_build_context_holds_what_pip_install_needs():
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = []
    for instr, a in dockerfile_instructions(DOCKERFILE.read_text()):
        if instr == "COPY":
            copied += a.split()[:-1]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", pyproject["project"]["readme"]]
    needed += [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    for path in needed:
        assert path in copied, f"Dockerfile does not COPY {path}"
    for path in copied:
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
        assert not any(fnmatch.fnmatch(path, pat) for pat in ignored), f".dockerignore drops {path}"
    assert ".venv" in ignored and ".git" in ignored
