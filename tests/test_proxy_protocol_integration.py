"""Behind real HAProxy (TCP mode; send-proxy-v2, send-proxy, TLS passed
through with send-proxy-v2, and the --metrics HTTP listener) in a network namespace: a real twistd front
proxy (haproxy: listeners) with a real owner proxy behind it over tcp://.
The front's audit log, --max-connections-per-peer and protected mode see
each client's own address, never the balancer's; a PROXY header from an
address that is not a trusted balancer is refused; the owner records on
whose behalf the front acted (CLIENT), and refuses CLIENT from an identity
that may not relay.  The run itself is tests/proxy_protocol_ns.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ADDRESSES = ("192.0.2.10", "192.0.2.21", "192.0.2.31", "192.0.2.77", "192.0.2.99")


@pytest.fixture(scope="module")
def run():
    if not shutil.which("haproxy") or not shutil.which("unshare"):
        pytest.fail("needs haproxy and unshare (Debian: haproxy, util-linux)")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxy_protocol_ns.py")
    setup = " && ".join(["ip link set lo up"] + [f"ip addr add {a}/32 dev lo" for a in ADDRESSES])
    done = subprocess.run(["unshare", "-rn", "sh", "-c", f"{setup} && exec {sys.executable} {script} "
                           f"{os.path.dirname(script)}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def host(peer):
    return peer.rpartition(":")[0]


def test_clients_behind_haproxy_are_served(run):
    assert run["v2"] == ["9000"]
    assert run["v1"] == ["9000"]
    assert run["tls"] == ">1:9000\n@@\n"


def test_the_front_audits_each_client_not_the_balancer(run):
    hosts = [host(r["peer"]) for r in run["front_audit"] if r["event"] == "request"]
    assert hosts[:3] == ["127.0.0.77", "127.0.0.78", "127.0.0.79"]  # v2, v1, TLS
    assert set(hosts) == {"127.0.0.77", "127.0.0.78", "127.0.0.79", "127.0.0.81", "127.0.0.82",
                          "127.0.0.83", "127.0.0.84", "127.0.0.90"}


def test_the_owner_records_on_whose_behalf_the_front_acted(run):
    front = [r for r in run["front_audit"] if r["event"] == "request"]
    owner = [r for r in run["owner_audit"] if r["event"] == "request"]
    assert len(owner) == len(front)
    for f, o in zip(front, owner):
        assert o["identity"] == "front"
        assert not o["peer"].startswith("127.")  # the front's own address
        assert o["on_behalf_of"] == {"peer": f["peer"], "identity": "anonymous", "frontend": "line"}


def test_protected_mode_sees_the_client(run):
    assert run["remote"] == ["C085"]  # 192.0.2.77 via a balancer on a trusted address
    assert "client 192.0.2.77:" in run["front_log"] and "protected mode" in run["front_log"]


def test_an_http_listener_behind_haproxy_sees_the_client(run):
    assert run["metrics_local"] == 200  # 127.0.0.77 behind the balancer: a loopback client
    assert run["metrics_remote"] == 403  # 192.0.2.77: protected mode refuses it
    assert run["healthz_remote"] == 200


def test_per_peer_limit_counts_clients_not_haproxy(run):
    pp = run["per_peer"]
    assert [pp[f"client{i}"] for i in range(4)] == [["9000"]] * 4  # 4 clients > 2 per peer: all served
    assert [pp[f"same{i}"] for i in range(3)] == [["9000"]] * 3
    assert pp["same0_after"] == ""  # the third of one client closed that client's idlest
    assert pp["same2_again"] == ["9000"]
    assert "closing the idle connection of 127.0.0.90:" in run["front_log"]


def test_a_proxy_header_from_an_untrusted_address_is_refused(run):
    assert "9000" not in json.dumps(run["forged"])
    lines = [line for line in run["front_log"].splitlines() if "not a trusted balancer" in line]
    assert len(lines) == 1 and "192.0.2.99" in lines[0]
    assert not any(host(r["peer"]) in ("127.0.0.1", "192.0.2.99") for r in run["front_audit"])


def test_client_from_an_identity_that_may_not_relay_is_refused_and_audited(run):
    assert run["not_relay"] == ["C085"]
    assert run["malformed"] == ["C084"]
    failures = [r for r in run["owner_audit"] if r["event"] == "auth_failure"]
    assert [(r["identity"], r["reason"]) for r in failures] == [
        ("plain", "CLIENT from an identity that may not relay")]
