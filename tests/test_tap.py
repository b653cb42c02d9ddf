import os
import subprocess

import pytest

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import tap
from cloudfoxy_proxy.backends.service import BackendService
from cloudfoxy_proxy.backends.emulated import EmulatedBackend
from cloudfoxy_proxy.frontends.base import Listener

from support import TWISTD


def parse(*args):
    o = tap.Options()
    o.parseOptions(list(args))
    return o


class OptionsTests(SynchronousTestCase):
    def test_defaults(self):
        o = parse()
        self.assertEqual(o["endpoints"], ["tcp:4001:backlog=1024"])
        self.assertEqual(o["command-timeout"], 15.0)
        self.assertGreaterEqual(o["max-line-length"], 3 * 65544)
        self.assertEqual(o["backend"], [])
        self.assertEqual(len(o["backend-makers"]), 1)  # emulated:
        self.assertEqual(o["log-level"], "info")
        self.assertIsNone(o["rest"])
        self.assertEqual(o["max-connections"], 10000)
        self.assertEqual(o["max-connections-per-peer"], 100)
        self.assertEqual(o["idle-timeout"], 300.0)
        self.assertEqual(o["max-buffered-bytes"], 64 * 1024 * 1024)
        self.assertEqual(parse("--idle-timeout", "0")["idle-timeout"], 0)

    def test_listeners_and_backends(self):
        o = parse("-p", "tcp:5000:interface=127.0.0.1", "--listen", "4002", "--listen", "tcp6:4003",
                  "--backend", "emulated:?cards=2", "--backend", "emulated:?prefix=Other")
        self.assertEqual(o["endpoints"], ["tcp:5000:interface=127.0.0.1:backlog=1024", "tcp:4002:backlog=1024",
                                          "tcp6:4003:backlog=1024"])
        o2 = parse("-p", "tcp:5000:backlog=10", "--listen", "unix:/tmp/fp.sock")
        self.assertEqual(o2["endpoints"], ["tcp:5000:backlog=10", "unix:/tmp/fp.sock"])
        self.assertEqual(len(o["backend-makers"]), 2)

    def test_invalid_values_name_the_option(self):
        for args, option in [
            (["--command-timeout", "soon"], "--command-timeout"),
            (["--command-timeout", "0"], "--command-timeout"),
            (["--max-line-length", "12"], "--max-line-length"),
            (["--max-connections", "-1"], "--max-connections"),
            (["--max-queue", "x"], "--max-queue"),
            (["--max-connections-per-peer", "0"], "--max-connections-per-peer"),
            (["--idle-timeout", "-1"], "--idle-timeout"),
            (["--idle-timeout", "soon"], "--idle-timeout"),
            (["--max-buffered-bytes", "100"], "--max-buffered-bytes"),
            (["--max-commands-per-request", "0"], "--max-commands-per-request"),
            (["--log-level", "loud"], "--log-level"),
            (["-p", "bogus:1"], "--port"),
            (["--listen", "tcp:notaport"], "--listen"),
            (["--backend", "nosuch://x"], "--backend"),
            (["--backend", "emulated:?cards=-3"], "--backend"),
            (["--vpcd", "localhost=Emulated 00"], "--vpcd"),
            (["--client-password-file", "/nonexistent/pw"], "--client-password-file"),
            (["--rest", "tcp:0"], "--rest"),
            (["--rest", "bogus:1"], "--rest 'bogus:1': not a valid endpoint"),
            (["--rest", "tcp:notaport"], "--rest 'tcp:notaport': not a valid endpoint"),
        ]:
            e = self.assertRaises(usage.UsageError, parse, *args)
            self.assertIn(option, str(e), args)

    def test_secret_from_file_and_environment(self):
        import tempfile

        fd, path = tempfile.mkstemp()
        self.addCleanup(os.remove, path)
        with os.fdopen(fd, "w") as f:
            f.write("hunter2\n")
        self.assertEqual(parse("--client-password-file", path)["client-password"], "hunter2")
        os.environ["FOXYPROXY_REST_TOKEN"] = "tok"
        self.addCleanup(os.environ.pop, "FOXYPROXY_REST_TOKEN")
        self.assertEqual(parse("--rest", "tcp:0")["rest-token"], "tok")

    def test_vpcd(self):
        o = parse("--vpcd", "127.0.0.1:35963=Emulated 00", "--vpcd", "[::1]:35964=Em")
        self.assertEqual(o["vpcd"], [("127.0.0.1", 35963, "Emulated 00", False), ("::1", 35964, "Em", False)])
        o = parse("--vpcd", "127.0.0.1:35963=Emulated 00?exclusive=1", "--vpcd", "127.0.0.1:1=Em?.*",
                  "--vpcd", "127.0.0.1:2=Em?exclusive=0")
        self.assertEqual(o["vpcd"], [("127.0.0.1", 35963, "Emulated 00", True), ("127.0.0.1", 1, "Em?.*", False),
                                     ("127.0.0.1", 2, "Em", False)])
        for bad in ("127.0.0.1:1=Em?exclusive=2", "127.0.0.1:1=Em?exlusive=1", "127.0.0.1:1=Em?exclusive=1&x=1"):
            with self.assertRaises(usage.UsageError) as e:
                parse("--vpcd", bad)
            self.assertIn("the only parameter is exclusive=0 or exclusive=1", str(e.exception))

    def test_service_tree(self):
        o = parse("--listen", "4002", "--backend", "emulated:?cards=3")
        top = tap.makeService(o, MemoryReactorClock())
        children = list(top)
        backends = [s for s in children if isinstance(s, BackendService)]
        listeners = [s for s in children if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(backends), 1)
        self.assertIsInstance(backends[0].backend, EmulatedBackend)
        self.assertEqual(len(backends[0].backend.cards), 3)
        self.assertEqual(len(listeners), 2)
        self.assertEqual(top.dispatcher.command_timeout, 15.0)

    def test_every_front_end_shares_one_connection_account(self):
        os.environ["FOXYPROXY_REST_TOKEN"] = "tok"
        self.addCleanup(os.environ.pop, "FOXYPROXY_REST_TOKEN")
        o = parse("--listen", "4002", "--rest", "tcp:0", "--max-connections", "50",
                  "--max-connections-per-peer", "7", "--idle-timeout", "12", "--max-buffered-bytes", "1000000")
        top = tap.makeService(o, MemoryReactorClock())
        limits = top.core.limits
        listeners = [s for s in top if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 3)
        for listener in listeners:
            self.assertIsInstance(listener, Listener)
            self.assertIs(listener.factory.limits, limits)
        self.assertEqual((limits.max_connections, limits.per_peer, limits.idle_timeout), (50, 7, 12.0))
        self.assertEqual(listeners[0].factory.wrappedFactory.buffers.total, 1000000)
        self.assertIs(listeners[2].factory.wrappedFactory.buffers, limits.buffers)  # REST: the same budget
        self.assertIs(listeners[0].factory.wrappedFactory.buffers, limits.buffers)


@pytest.mark.integration
class CommandLineTests(SynchronousTestCase):
    """twistd itself: help documents every option; bad values give one line."""

    def run_twistd(self, *args):
        return subprocess.run([TWISTD, "-n", "--pidfile=", "foxyproxy", *args], capture_output=True,
                              text=True, timeout=60)

    def test_help_documents_every_option(self):
        out = self.run_twistd("--help").stdout
        for option in ["--port", "--listen", "--backend", "--command-timeout", "--max-line-length",
                       "--max-commands-per-request", "--max-connections", "--max-queue", "--log-level",
                       "--rest", "--rest-token-file", "--token-file", "--password-file", "--vpcd", "--ca-certs",
                       "--idle-timeout", "--max-connections-per-peer", "--max-buffered-bytes",
                       "--ram", "--ram-token-file", "--ram-connect", "--ram-daemon", "--ram-approved-urls",
                       "--ram-reader"]:
            self.assertIn(option, out)

    def test_bad_value_is_one_line(self):
        r = self.run_twistd("--command-timeout", "soon")
        self.assertNotEqual(r.returncode, 0)
        self.assertEqual(r.stdout, "")
        self.assertEqual(r.stderr.strip().splitlines(),
                         ["twistd foxyproxy: --command-timeout 'soon': not a number"])
        r = self.run_twistd("--no-such-option")
        self.assertNotEqual(r.returncode, 0)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertNotIn("Traceback", r.stderr + r.stdout)

    def test_empty_secret_stops_start_up_in_one_line(self):
        import tempfile

        with tempfile.NamedTemporaryFile("w") as f:
            f.write("\n")
            f.flush()
            r = self.run_twistd("--client-password-file", f.name)
        self.assertNotEqual(r.returncode, 0)
        self.assertEqual(r.stderr.strip().splitlines(),
                         [f"twistd foxyproxy: --client-password-file {f.name!r}: the file is empty "
                          f"(its first line holds no secret)"])

    def test_busy_port_is_one_line_for_every_listener(self):
        import socket

        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            with socket.socket() as free:
                free.bind(("127.0.0.1", 0))
                free_port = free.getsockname()[1]
            env = dict(os.environ, FOXYPROXY_REST_TOKEN="tok")
            for args, endpoint in [
                (["-p", f"tcp:{port}:interface=127.0.0.1"], f"tcp:{port}:interface=127.0.0.1:backlog=1024 (--port)"),
                (["-p", f"tcp:{free_port}:interface=127.0.0.1", "--rest", f"tcp:{port}:interface=127.0.0.1"],
                 f"tcp:{port}:interface=127.0.0.1:backlog=1024 (--rest)"),
                (["-p", f"tcp:{free_port}:interface=127.0.0.1", "--listen", f"tcp:{port}:interface=127.0.0.1"],
                 f"tcp:{port}:interface=127.0.0.1:backlog=1024 (--listen)"),
                (["-p", f"tcp:{free_port}:interface=127.0.0.1", "--metrics", f"tcp:{port}:interface=127.0.0.1"],
                 f"tcp:{port}:interface=127.0.0.1:backlog=1024 (--metrics)"),
            ]:
                # twistd -n logs to stdout, and the message goes to the log
                r = subprocess.run([TWISTD, "-n", "--pidfile=", "foxyproxy", "--no-signing", *args],
                                   capture_output=True, text=True, timeout=60, env=env)
                self.assertEqual(r.returncode, 1, args)
                self.assertNotIn("Traceback", r.stderr + r.stdout)
                problems = [line.split("] ", 1)[1] for line in r.stdout.splitlines() if "#error]" in line]
                self.assertEqual(problems, [f"twistd foxyproxy: cannot listen on {endpoint}: Address already in use"],
                                 r.stdout)
