"""The capture rules as planned (no root needed): a golden per interesting configuration,
made through the command's own flags (``controlplane capture --dry-run``), and the
scripts that install and clean them against a given nat table.

Regenerate the goldens with ``pytest --update-golden`` and review the diff like code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.cli import main
from controlplane.inject.capture import (
    CaptureConfig,
    CaptureError,
    clean_plan,
    clean_script,
    install_script,
    plan,
    render,
)
from tests.support.golden import Goldens

GOLDENS = Goldens(Path(__file__).parent / "testdata" / "capture", output_dir="",
                  output_suffix=".rules")  # the cases are named here, not by input files

CASES = {
    # an injected pod with no annotations
    "defaults": [],
    # the mesh.controlplane.io/exclude-* annotations, and the xDS address
    "exclusions": ["--exclude-outbound-ports", "9090,9091", "--exclude-outbound-cidrs",
                   "169.254.169.254/32,10.0.0.0/8", "--exclude-inbound-ports", "8081",
                   "--exclude-address", "10.96.0.20:18000"],
    # mesh.controlplane.io/include-inbound-ports: only these go to the sidecar
    "include-inbound-ports": ["--include-inbound-ports", "8080,9080,15021"],
    # include-inbound-ports '': no inbound capture, so no PREROUTING jump either
    "no-inbound": ["--include-inbound-ports", ""],
    # only the cluster's service range is captured outbound
    "include-outbound-cidrs": ["--include-outbound-cidrs", "10.96.0.0/12"],
    # more ports than one multiport match takes (15)
    "many-ports": ["--exclude-outbound-ports", ",".join(str(p) for p in range(7000, 7020))],
    # a dual-stack pod
    "ipv6": ["--ipv6", "--exclude-outbound-cidrs", "10.0.0.0/8,fd00::/8",
             "--exclude-address", "[fd00::20]:18000", "--exclude-address", "10.96.0.20:18000"],
    # another proxy UID and ports
    "custom-proxy": ["--proxy-uid", "2000", "--proxy-gid", "3000", "--outbound-port", "16001",
                     "--inbound-port", "16006"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_golden(name: str, request: pytest.FixtureRequest,
                     capsys: pytest.CaptureFixture[str]) -> None:
    args = CASES[name]
    assert main(["capture", "--dry-run", *args]) == 0
    shown = " ".join(repr(a) if a in ("", "*") else a for a in args)
    text = f"# controlplane capture {shown}".rstrip() + "\n" + capsys.readouterr().out
    GOLDENS.check(name, text, request, "the planned rules differ from the golden file")


def test_clean_plan_golden(request: pytest.FixtureRequest) -> None:
    GOLDENS.check("clean", render(clean_plan()), request,
                  "the cleaning plan differs from the golden file")


def test_no_golden_is_stale(request: pytest.FixtureRequest) -> None:
    GOLDENS.check_no_stale(request, [*CASES, "clean"])


def test_plan_is_deterministic() -> None:
    config = CaptureConfig(exclude_outbound_ports=(3, 1, 2), exclude_outbound_cidrs=("10.0.0.0/8",))
    assert plan(config) == plan(config)


def test_every_problem_is_named_by_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["capture", "--dry-run", "--proxy-uid", "0", "--include-inbound-ports", "80,x",
                 "--exclude-outbound-cidrs", "10.0.0.0/8,nowhere", "--outbound-port", "70000"])
    err = capsys.readouterr().err
    assert code == 1
    assert "--proxy-uid: 0 is not an id above 0" in err
    assert "--include-inbound-ports: 'x' is not a port" in err
    assert "--exclude-outbound-cidrs: 'nowhere' is not a CIDR" in err
    assert "--outbound-port: 70000 is not a port" in err
    assert len(err.strip().splitlines()) == 4  # one line each, no traceback


def test_a_bad_port_list_and_address_say_what_to_give(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", "--dry-run", "--exclude-outbound-ports", "80,http"]) == 1
    assert "--exclude-outbound-ports: 'http' is not a port (1-65535); give a comma list" in (
        capsys.readouterr().err)
    assert main(["capture", "--dry-run", "--exclude-address", "10.0.0.1"]) == 1
    assert "--exclude-address: '10.0.0.1' is not HOST:PORT; give HOST:PORT" in (
        capsys.readouterr().err)
    with pytest.raises(CaptureError, match="names are resolved by the command"):
        plan(CaptureConfig(exclude_addresses=("xds.example:18000",)))


def test_a_name_in_exclude_address_is_resolved(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", "--dry-run", "--exclude-address", "localhost:18000"]) == 0
    assert "-d 127.0.0.1/32 -p tcp -m tcp --dport 18000 -j RETURN" in capsys.readouterr().out


def test_an_unresolvable_name_is_skipped_with_a_warning(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", "--dry-run", "--exclude-address", "no-such-host.invalid:18000"]) == 0
    captured = capsys.readouterr()
    assert "capture.exclude_address_unresolved" in captured.err
    assert "--dport 18000" not in captured.out


EMPTY = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A OUTPUT -p udp -j RETURN
COMMIT
"""


def installed(saved: str, rules: list[tuple[str, ...]]) -> str:
    """A nat table as iptables-save would print it after our rules, on top of ``saved``."""
    lines = saved.splitlines()
    end = lines.index("COMMIT")
    chains = [f":{r[3]} - [0:0]" for r in rules if r[2] == "-N"]
    body = [" ".join(r[2:]) for r in rules if r[2] == "-A"]
    return "\n".join([*lines[:end], *chains, *body, *lines[end:]]) + "\n"


def test_install_script_on_a_fresh_table_adds_chains_rules_and_two_jumps() -> None:
    rules = plan(CaptureConfig())
    script = install_script(rules, EMPTY).splitlines()
    assert script[0] == "*nat" and script[-1] == "COMMIT"
    assert ":CONTROLPLANE_OUTPUT - [0:0]" in script
    assert script.count("-A OUTPUT -p tcp -j CONTROLPLANE_OUTPUT") == 1
    assert script.count("-A PREROUTING -p tcp -j CONTROLPLANE_INBOUND") == 1
    assert not any(line.startswith("-D") for line in script)
    assert "-A OUTPUT -p udp -j RETURN" not in script  # foreign rules untouched


def test_install_script_again_keeps_the_jumps_and_drops_copies_and_stale_ones() -> None:
    rules = plan(CaptureConfig())
    again = install_script(rules, installed(EMPTY, rules)).splitlines()
    assert not any(line.startswith(("-A OUTPUT", "-A PREROUTING", "-D")) for line in again)
    doubled = installed(EMPTY, rules).replace(
        "-A OUTPUT -p tcp -j CONTROLPLANE_OUTPUT",
        "-A OUTPUT -p tcp -j CONTROLPLANE_OUTPUT\n-A OUTPUT -p tcp -j CONTROLPLANE_OUTPUT")
    script = install_script(rules, doubled).splitlines()
    assert script.count("-D OUTPUT -p tcp -j CONTROLPLANE_OUTPUT") == 1
    no_inbound = plan(CaptureConfig(include_inbound_ports=""))
    script = install_script(no_inbound, installed(EMPTY, rules)).splitlines()
    assert "-D PREROUTING -p tcp -j CONTROLPLANE_INBOUND" in script


def test_clean_script_removes_only_ours() -> None:
    assert clean_script(EMPTY) is None
    script = clean_script(installed(EMPTY, plan(CaptureConfig())))
    assert script is not None
    lines = script.splitlines()
    assert "-D OUTPUT -p tcp -j CONTROLPLANE_OUTPUT" in lines
    assert "-D PREROUTING -p tcp -j CONTROLPLANE_INBOUND" in lines
    assert {line for line in lines if line.startswith("-X")} == {
        "-X CONTROLPLANE_INBOUND", "-X CONTROLPLANE_IN_REDIRECT", "-X CONTROLPLANE_OUTPUT",
        "-X CONTROLPLANE_REDIRECT"}
    assert not any("udp" in line for line in lines)
