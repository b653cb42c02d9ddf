"""Options and wiring of the signing commands: --ca-certs, --no-signing,
emulated signing-card URLs, and the service tree."""

import os
import shutil
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import tap
from cloudfoxy_proxy.backends import emulated
from cloudfoxy_proxy.cards.openpgp import OpenPgpCard
from cloudfoxy_proxy.cards.piv import PivCard
from cloudfoxy_proxy.cards.pki import get_pki
from cloudfoxy_proxy.signing.index import CertIndex


def scratch(case):
    """A fresh directory name under the system temp dir, removed after the test."""
    base = tempfile.mkdtemp(prefix="foxy-signing-")
    case.addCleanup(shutil.rmtree, base, True)
    return os.path.join(base, "x")


def parse(*args):
    o = tap.Options()
    o.parseOptions(list(args))
    return o


class OptionTests(SynchronousTestCase):
    def test_ca_certs(self):
        d = scratch(self)
        os.makedirs(d)
        path = os.path.join(d, "ca.pem")
        with open(path, "wb") as f:
            f.write(get_pki().ca_pem())
        self.assertEqual(len(parse("--ca-certs", path)["ca-cert-list"]), 2)
        self.assertEqual(len(parse("--ca-certs", d)["ca-cert-list"]), 2)
        self.assertEqual(parse()["ca-cert-list"], [])
        with open(os.path.join(d, "junk.pem"), "w") as f:
            f.write("junk")
        e = self.assertRaises(usage.UsageError, parse, "--ca-certs", os.path.join(d, "junk.pem"))
        self.assertIn("--ca-certs", str(e))
        self.assertRaises(usage.UsageError, parse, "--ca-certs", os.path.join(d, "missing"))

    def test_signing_backend_urls(self):
        o = parse("--backend", "emulated:?type=piv&cards=1&prefix=Q&pin=24681357",
                  "--backend", "emulated:?type=openpgp&cards=2&prefix=Q")
        piv, pgp = [make(MemoryReactorClock()) for make in o["backend-makers"]]
        self.assertIsInstance(piv.cards[0], PivCard)
        self.assertEqual(piv.cards[0]._pin, b"24681357")
        self.assertEqual([type(c) for c in pgp.cards], [OpenPgpCard, OpenPgpCard])
        self.assertEqual(pgp.cards[1].sig.cert.subject.rfc4514_string(), "CN=Q OpenPGP 01 Signing,O=CloudFoxy Emulated")
        for bad in ("emulated:?type=piv&pin=12345", "emulated:?type=piv&pin=123456789",
                    "emulated:?type=openpgp&pin=1", "emulated:?pin=123456", "emulated:?keys=/tmp"):
            self.assertRaises(ValueError, emulated.from_url, bad, {})
        f = scratch(self)
        open(f, "w").close()
        self.assertRaises(ValueError, emulated.from_url, f"emulated:?type=piv&keys={f}", {})

    def test_keys_dir_is_loaded_or_written(self):
        d = scratch(self)
        make = emulated.from_url(f"emulated:?type=piv&cards=1&prefix=K&keys={d}")
        card = make(MemoryReactorClock()).cards[0]
        names = sorted(os.listdir(d))
        self.assertIn("ca.pem", names)
        self.assertIn("k-piv-00-signing-p256.key.pem", names)
        self.assertEqual(os.stat(os.path.join(d, "k-piv-00-signing-p256.key.pem")).st_mode & 0o777, 0o600)
        # another process (a new Pki for the directory) loads the same keys
        from cloudfoxy_proxy.cards.pki import Pki

        again = Pki(os.path.abspath(d))
        self.assertEqual(again.leaf("K PIV 00 Signing", "p256").der, card.keys[0x9C][1].der)
        self.assertEqual(again.root.cert, get_pki(d).root.cert)


class ServiceTests(SynchronousTestCase):
    def test_index_is_wired(self):
        top = tap.makeService(parse("--backend", "emulated:?type=piv&cards=1&prefix=W"), MemoryReactorClock())
        certindex = top.core.dispatcher.signing
        self.assertIsInstance(certindex, CertIndex)
        self.assertIs(top.dispatcher, top.core.dispatcher)  # the one dispatcher every front end uses
        self.assertIs(certindex.registry, top.core.registry)  # it watches the readers of the tree
        self.assertTrue(certindex.started)

    def test_index_is_a_service_stopped_with_the_application(self):
        reactor = MemoryReactorClock()
        top = tap.makeService(parse("--backend", "emulated:?type=piv&cards=1&prefix=W"), reactor)
        certindex = top.core.dispatcher.signing
        self.assertIs(certindex.parent, top)
        top.startService()
        self.assertTrue(certindex.running)
        self.assertEqual(list(certindex._arrivals), list(top.core.registry.readers))  # the emulated card's
        pending = certindex._arrival_call
        self.assertTrue(pending.active())  # its arrival probe, not run yet
        top.stopService()
        self.assertFalse(certindex.running)
        self.assertFalse(pending.active())  # cancelled, never run
        self.assertEqual(list(certindex._arrivals), [])

    def test_no_signing(self):
        top = tap.makeService(parse("--no-signing"), MemoryReactorClock())
        self.assertIsNone(top.core.dispatcher.signing)
        self.assertEqual([s for s in top if isinstance(s, CertIndex)], [])
