"""The pod's traffic capture rules, planned: pure, so reviewers read them in goldens
(tests/testdata/capture/*.rules) and ``controlplane capture --dry-run`` prints them.

The rules are Istio's, as its users know them (facts from istio-iptables, our own
chains). In the nat table, one jump each from PREROUTING and OUTPUT into chains that are
ours alone:

- ``CONTROLPLANE_OUTPUT`` (from OUTPUT, TCP): the pod's outgoing connections.
  1. ``-s 127.0.0.6 -o lo``: left alone. The sidecar's inbound listener forwards to the
     app's original destination (pod IP:port) from source 127.0.0.6, as Istio's inbound
     passthrough does, so rule 3 cannot send that connection back to 15006 (a loop).
  2. excluded destination ports and ``HOST:PORT`` addresses (e.g. the xDS server):
     left alone, for every UID.
  3. the proxy (UID or GID 1337) over ``lo`` to a non-loopback address: the proxy calling
     its own pod IP, which is how an app calling its own Service comes back in, so it goes
     to the inbound port (only when inbound capture is on).
  4. anything else over ``lo`` (the app calling localhost or its own pod IP): left alone.
  5. anything else from the proxy's UID or GID: left alone (its upstream connections
     and its xDS stream are never captured: no loop).
  6. loopback destinations, excluded CIDRs: left alone.
  7. included CIDRs (``*``: every destination): to the outbound port 15001.
- ``CONTROLPLANE_INBOUND`` (from PREROUTING, TCP): connections arriving at the pod.
  The sidecar's own ports (15000 admin, 15001, 15006, 15021 health, 15090 stats) and
  excluded ports are left alone; included ports (``*``: every port) go to 15006.
- ``CONTROLPLANE_REDIRECT`` / ``CONTROLPLANE_IN_REDIRECT``: the two REDIRECTs.

Where we differ from Istio: "loopback" is all of 127.0.0.0/8 (Istio: 127.0.0.1 only, so
its proxy's calls to 127.0.0.2 go inbound); rule 3 only with inbound capture on (Istio
keeps it, so with inbound capture off a pod calling itself through its Service still
goes through the inbound listener; for us off means off, both ways); no DNS or UDP
capture (the sidecar has no DNS proxy); no 15008 (no HBONE); ``HOST:PORT`` exclusions,
which Istio has not (its proxy's UID covers its own xDS stream; ours lets any process of
the pod reach the control plane directly, e.g. a debugging client).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from controlplane.errors import ControlPlaneError

Rule = tuple[str, ...]  # iptables argv words after ``iptables`` (or ``ip6tables``)

INBOUND = "CONTROLPLANE_INBOUND"
IN_REDIRECT = "CONTROLPLANE_IN_REDIRECT"
OUTPUT = "CONTROLPLANE_OUTPUT"
REDIRECT = "CONTROLPLANE_REDIRECT"
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
PREFIX = "CONTROLPLANE_"  # every chain we make starts with this; no other does
SIDECAR_PORTS = (15000, 15001, 15006, 15021, 15090)  # never captured inbound
_HOOKS = ("PREROUTING", "OUTPUT")  # the built-in chains we jump from
_MULTIPORT_MAX = 15  # ports one ``-m multiport`` match takes

_FAMILY = {  # 127.0.0.6 / ::6: the source of the sidecar's inbound passthrough (Istio's)
    4: {"loopback": "127.0.0.0/8", "passthrough_source": "127.0.0.6/32", "binary": "iptables"},
    6: {"loopback": "::1/128", "passthrough_source": "::6/128", "binary": "ip6tables"},
}


class CaptureError(ControlPlaneError):
    """Capture cannot be planned or installed; ``problems`` holds one line per problem,
    each naming the flag (or annotation) and what to give instead."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture. Defaults are an injected pod's: everything in and out, but the
    proxy's own traffic."""

    proxy_uid: int = 1337
    """The sidecar's UID: its traffic is never redirected (but to its own pod IP)."""
    proxy_gid: int | None = None
    """The sidecar's GID, likewise; None: the same number as ``proxy_uid``."""
    outbound_port: int = 15001
    """Where the app's outgoing TCP goes (the sidecar's egress listener)."""
    inbound_port: int = 15006
    """Where TCP to the app's ports goes (the sidecar's inbound listener)."""
    include_inbound_ports: str = "*"
    """``*`` every port, a comma list of ports, or empty for no inbound capture."""
    exclude_inbound_ports: tuple[int, ...] = ()
    """Inbound ports left alone, beside the sidecar's own (``SIDECAR_PORTS``)."""
    exclude_outbound_ports: tuple[int, ...] = ()
    """Destination ports the app reaches directly."""
    exclude_outbound_cidrs: tuple[str, ...] = ()
    """Destination networks the app reaches directly."""
    include_outbound_cidrs: str = "*"
    """``*`` every destination, a comma list of CIDRs, or empty for no outbound capture."""
    exclude_addresses: tuple[str, ...] = ()
    """``IP:PORT`` (``[IPv6]:PORT``) destinations left alone, e.g. the xDS server."""
    ipv6: bool = False
    """Program ip6tables too (IPv4 rules are always installed)."""

    @property
    def gid(self) -> int:
        return self.proxy_uid if self.proxy_gid is None else self.proxy_gid


def parse_ports(text: str, field: str) -> tuple[int, ...]:
    """``"8080, 9090"`` -> ``(8080, 9090)``; a word that is no port raises, naming ``field``."""
    ports = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        if not word.isdigit() or not 1 <= int(word) <= 65535:
            raise CaptureError([f"{field}: {word!r} is not a port (1-65535); give a comma "
                                "list of ports, e.g. 8080,9090"])
        ports.append(int(word))
    return tuple(dict.fromkeys(ports))


def parse_list(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(w.strip() for w in text.split(",") if w.strip())


def split_address(text: str) -> tuple[str, int]:
    """``"10.0.0.1:18000"`` or ``"[fd00::1]:18000"`` -> (host, port); ValueError if not."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def problems(config: CaptureConfig) -> list[str]:
    """Every problem with ``config``, each naming its flag; empty when it is sound."""
    found = []
    ids = [("--proxy-uid", config.proxy_uid)]
    ids += [("--proxy-gid", config.proxy_gid)] if config.proxy_gid is not None else []
    for flag, number in ids:
        if not 0 < number < 2**32:
            found.append(f"{flag}: {number} is not an id above 0 (root's traffic would "
                         "escape capture); give the sidecar's own, e.g. 1337")
    for flag, port in (("--outbound-port", config.outbound_port),
                       ("--inbound-port", config.inbound_port)):
        if not 1 <= port <= 65535:
            found.append(f"{flag}: {port} is not a port (1-65535)")
    if config.include_inbound_ports.strip() != "*":
        try:
            parse_ports(config.include_inbound_ports, "--include-inbound-ports")
        except CaptureError as exc:
            found += exc.problems
    for flag, ports in (("--exclude-inbound-ports", config.exclude_inbound_ports),
                        ("--exclude-outbound-ports", config.exclude_outbound_ports)):
        found += [f"{flag}: {p} is not a port (1-65535)" for p in ports if not 1 <= p <= 65535]
    cidrs = [("--exclude-outbound-cidrs", c) for c in config.exclude_outbound_cidrs]
    if config.include_outbound_cidrs.strip() != "*":
        cidrs += [("--include-outbound-cidrs", c)
                  for c in parse_list(config.include_outbound_cidrs)]
    for flag, cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            found.append(f"{flag}: {cidr!r} is not a CIDR; give e.g. 10.0.0.0/8 or "
                         "169.254.169.254/32")
    for address in config.exclude_addresses:
        try:
            ipaddress.ip_address(split_address(address)[0])
        except ValueError:
            found.append(f"--exclude-address: {address!r} is not IP:PORT (names are "
                         "resolved by the command before planning); give e.g. "
                         "10.96.0.20:18000")
    return found


def _nat(*words: str) -> Rule:
    return ("-t", "nat", *words)


def _ports_match(ports: Iterable[int], negate: bool = False) -> list[tuple[str, ...]]:
    """The ``-p tcp`` port matches for ``ports``: one ``--dport`` for a single port, else
    ``multiport`` in chunks of 15 (iptables' limit per match)."""
    unique = list(dict.fromkeys(ports))
    bang = ("!",) if negate else ()
    if len(unique) == 1:
        return [("-p", "tcp", "-m", "tcp", *bang, "--dport", str(unique[0]))]
    return [("-p", "tcp", "-m", "multiport", *bang, "--dports",
             ",".join(str(p) for p in unique[i:i + _MULTIPORT_MAX]))
            for i in range(0, len(unique), _MULTIPORT_MAX)]


def _in_family(network: str, family: int) -> bool:
    return ipaddress.ip_network(network, strict=False).version == family


def _cidr(network: str) -> str:
    return str(ipaddress.ip_network(network, strict=False))


def _inbound_excluded(config: CaptureConfig) -> list[int]:
    """Never captured inbound: the sidecar's own ports (as configured, too) and the
    excluded ones."""
    return list(dict.fromkeys([*SIDECAR_PORTS, config.outbound_port, config.inbound_port,
                               *config.exclude_inbound_ports]))


def inbound_ports(config: CaptureConfig) -> tuple[int, ...] | None:
    """The ports captured inbound: None for every port but the excluded, () for none."""
    include = config.include_inbound_ports.strip()
    if include == "*":
        return None
    excluded = set(_inbound_excluded(config))
    return tuple(p for p in parse_ports(include, "--include-inbound-ports") if p not in excluded)


def plan(config: CaptureConfig, family: int = 4) -> list[Rule]:
    """The rules that install capture for one address family (4: iptables, 6:
    ip6tables), in order; deterministic. Raises CaptureError with every problem."""
    found = problems(config)
    if found:
        raise CaptureError(found)
    rules: list[Rule] = [_nat("-N", chain) for chain in CHAINS]
    rules.append(_nat("-A", REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports",
                      str(config.outbound_port)))
    rules.append(_nat("-A", IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT", "--to-ports",
                      str(config.inbound_port)))
    ports = inbound_ports(config)
    capture_inbound = ports != ()
    if ports is None:
        rules += [_nat("-A", INBOUND, *match, "-j", "RETURN")
                  for match in _ports_match(_inbound_excluded(config))]
        rules.append(_nat("-A", INBOUND, "-p", "tcp", "-j", IN_REDIRECT))
    elif ports:
        rules += [_nat("-A", INBOUND, *match, "-j", IN_REDIRECT) for match in _ports_match(ports)]
    rules += _output_rules(config, family, capture_inbound)
    if capture_inbound:
        rules.append(_nat("-A", "PREROUTING", "-p", "tcp", "-j", INBOUND))
    rules.append(_nat("-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT))
    return rules


def _output_rules(config: CaptureConfig, family: int, capture_inbound: bool) -> list[Rule]:
    facts = _FAMILY[family]
    loopback = facts["loopback"]
    rules: list[Rule] = [_nat("-A", OUTPUT, "-s", facts["passthrough_source"], "-o", "lo",
                              "-j", "RETURN")]
    if config.exclude_outbound_ports:
        rules += [_nat("-A", OUTPUT, *match, "-j", "RETURN")
                  for match in _ports_match(config.exclude_outbound_ports)]
    for address in config.exclude_addresses:
        host, port = split_address(address)
        ip = ipaddress.ip_address(host)
        if ip.version == family:
            rules.append(_nat("-A", OUTPUT, "-d", _cidr(str(ip)), "-p", "tcp", "-m", "tcp",
                              "--dport", str(port), "-j", "RETURN"))
    for match, owner in (("--uid-owner", str(config.proxy_uid)),
                         ("--gid-owner", str(config.gid))):
        if capture_inbound:
            rules.append(_nat("-A", OUTPUT, "!", "-d", loopback, "-o", "lo", "-p", "tcp",
                              "-m", "owner", match, owner, "-j", IN_REDIRECT))
        rules.append(_nat("-A", OUTPUT, "-o", "lo", "-m", "owner", "!", match, owner,
                          "-j", "RETURN"))
        rules.append(_nat("-A", OUTPUT, "-m", "owner", match, owner, "-j", "RETURN"))
    rules.append(_nat("-A", OUTPUT, "-d", loopback, "-j", "RETURN"))
    rules += [_nat("-A", OUTPUT, "-d", _cidr(c), "-j", "RETURN")
              for c in config.exclude_outbound_cidrs if _in_family(c, family)]
    include = config.include_outbound_cidrs.strip()
    if include == "*":
        rules.append(_nat("-A", OUTPUT, "-j", REDIRECT))
    else:
        rules += [_nat("-A", OUTPUT, "-d", _cidr(c), "-j", REDIRECT)
                  for c in parse_list(include) if _in_family(c, family)]
    return rules


def clean_plan() -> list[Rule]:
    """What ``--clean`` removes, nominally: our two jumps, then our chains (flushed first,
    as they refer to each other). The command removes what it finds (``clean_script``)."""
    return [_nat("-D", "PREROUTING", "-p", "tcp", "-j", INBOUND),
            _nat("-D", "OUTPUT", "-p", "tcp", "-j", OUTPUT),
            *(_nat("-F", chain) for chain in CHAINS),
            *(_nat("-X", chain) for chain in CHAINS)]


def render(rules: Iterable[Rule], family: int = 4) -> str:
    """Rules as the shell lines that would install them, one a line."""
    binary = _FAMILY[family]["binary"]
    return "".join(" ".join((binary, *rule)) + "\n" for rule in rules)


def _our_jumps(saved: str) -> list[str]:
    """The lines of an ``iptables-save -t nat`` that jump from PREROUTING or OUTPUT into
    our chains (ours alone are named CONTROLPLANE_*)."""
    jumps = []
    for line in saved.splitlines():
        words = line.split()
        if (len(words) > 2 and words[0] == "-A" and words[1] in _HOOKS
                and words[-2] == "-j" and words[-1].startswith(PREFIX)):
            jumps.append(line)
    return jumps


def _our_chains(saved: str) -> list[str]:
    return [line[1:].split()[0] for line in saved.splitlines()
            if line.startswith(f":{PREFIX}")]


def install_script(rules: list[Rule], saved: str) -> str:
    """An ``iptables-restore --noflush`` script that makes the nat table hold exactly
    ``rules`` (from ``plan``) in our chains, given the table as it is now (``saved``):
    our chains are created or flushed (a ``:CHAIN`` line does both), jumps we want and
    have stay where they are, jumps we have twice or no longer want go. Atomic: the
    whole script applies, or none of it."""
    wanted = [" ".join(r[2:]) for r in rules if r[2] == "-A" and r[3] in _HOOKS]
    keep = list(wanted)
    lines = ["*nat"]
    for jump in _our_jumps(saved):
        if jump in keep:
            keep.remove(jump)
        else:
            lines.append("-D" + jump[2:])
    lines += [f":{r[3]} - [0:0]" for r in rules if r[2] == "-N"]
    lines += [" ".join(r[2:]) for r in rules if r[2] == "-A" and r[3].startswith(PREFIX)]
    lines += [jump for jump in wanted if jump in keep]
    return "\n".join([*lines, "COMMIT", ""])


def clean_script(saved: str) -> str | None:
    """An ``iptables-restore --noflush`` script removing every jump into our chains and
    the chains themselves, given the table as it is now; None when nothing of ours is
    there. Nothing else is touched."""
    jumps = _our_jumps(saved)
    chains = _our_chains(saved)
    if not jumps and not chains:
        return None
    lines = ["*nat", *("-D" + jump[2:] for jump in jumps)]
    lines += [f":{chain} - [0:0]" for chain in chains]
    lines += [f"-X {chain}" for chain in chains]
    return "\n".join([*lines, "COMMIT", ""])
