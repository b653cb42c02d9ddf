"""The certificate index and ENUM, ALIASES, CHAIN and SIGN through the
in-memory line protocol (StringTransport, Clock)."""

import base64
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from twisted.internet.task import Clock
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.backends import emulated
from cloudfoxy_proxy.backends.emulated import EmulatedBackend
from cloudfoxy_proxy.cards.pki import get_pki
from cloudfoxy_proxy.cards.piv import PivCard
from cloudfoxy_proxy.signing.certs import build_chain, load_ca_certs
from cloudfoxy_proxy.signing.index import CertIndex, parse_digest
from cloudfoxy_proxy.access import Access
from cloudfoxy_proxy.dispatch import Dispatcher
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.registry import ReaderRegistry
from cloudfoxy_proxy.frontends.line import LineFactory

#: a loopback client: served in protected mode (docs/security.md)
LOCAL = IPv4Address("TCP", "127.0.0.1", 40000)

HASH = {20: hashes.SHA1(), 32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}
SHA256 = hashlib.sha256(b"message").digest()


class Counting(EmulatedBackend):
    """An emulated backend that counts the APDUs it gets."""

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        self.apdus = 0
        self.sent = []

    def transmit(self, key, apdu):
        self.apdus += 1
        self.sent.append(apdu.hex().upper())
        return super().transmit(key, apdu)


def backend(clock, kind, prefix, cards=2, latency=0.0, **kw):
    make = emulated.from_url(f"emulated:?type={kind}&cards={cards}&prefix={prefix}")
    made = make(clock)
    return Counting(clock, made.cards, latency=latency, prefix=prefix, kind=kind)


def b64list(text):
    return [base64.b64decode(x).decode() for x in text.split("|")] if text else []


def verify(der, digest, signature):
    key = x509.load_der_x509_certificate(der).public_key()
    algorithm = utils.Prehashed(HASH[len(digest)])
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, digest, ec.ECDSA(algorithm))
    else:
        key.verify(signature, digest, padding.PKCS1v15(), algorithm)


class Harness:
    def __init__(self, password=None, timeout=15.0, ca_certs=(), extra=()):
        self.clock = Clock()
        self.registry = ReaderRegistry()
        access = Access(simple=[(password, None)]) if password is not None else None
        self.dispatcher = Dispatcher(self.registry, self.clock, timeout, access=access)
        self.index = CertIndex(self.registry, self.clock, timeout, ca_certs=ca_certs)
        self.dispatcher.signing = self.index
        self.index.start()
        self.piv = backend(self.clock, "piv", "P")
        self.pgp = backend(self.clock, "openpgp", "G")
        self.iso = backend(self.clock, "iso7816", "I", cards=1)
        self.backends = [self.piv, self.pgp, self.iso] + list(extra)
        for b in self.backends:
            b.start(self.registry)
        self.clock.advance(0)  # arrival probes
        self.factory = LineFactory(self.dispatcher)
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=LOCAL)
        self.proto.makeConnection(self.transport)

    def apdus(self):
        return sum(b.apdus for b in self.backends)

    def send(self, text):
        self.proto.dataReceived(text.encode("utf-8"))
        out = self.transport.value().decode("utf-8")
        self.transport.clear()
        return out

    def results(self, text):
        out = self.send(text)
        assert out.endswith("@@\n"), out
        return [line.split(":", 1)[1] for line in out.splitlines()[:-1]]

    def result(self, text):
        [r] = self.results(text)
        return r

    def sign(self, alias, pin, digest=SHA256, obj=""):
        tail = f":{obj}" if obj else ""
        return self.result(f">{alias}:{pin}|\n>1:SIGN:{digest.hex()}{tail}|\n\n")

    def chain(self, alias):
        r = self.result(f">{alias}|\n>1:CHAIN|\n\n")
        return r if errors.is_error(r) else [base64.b64decode(c) for c in r.split(":")]


ALIASES = ["P PIV 00 Signing", "P PIV 00 Authentication", "P PIV 01 Signing", "P PIV 01 Authentication",
           "G OpenPGP 00 Signing", "G OpenPGP 01 Signing"]


class ListingTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness()

    def test_aliases_and_enum_from_the_cache(self):
        before = self.h.apdus()
        self.assertGreater(before, 0)  # the arrival probes
        aliases, enum = self.h.results(">*|\n>1:ALIASES|\n>2:ENUM|\n\n")
        self.assertEqual(b64list(aliases), ALIASES)
        self.assertEqual(b64list(enum), ["P 00", "P 01", "G 00", "G 01"])  # not the ISO card
        self.assertEqual(self.h.result(">*|\n>1:ENUM:2|\n\n").split("|"), enum.split("|")[:2])
        self.assertEqual(self.h.result(">*|\n>1:ENUM:x|\n\n"), errors.MALFORMED)
        self.assertEqual(self.h.apdus(), before)  # no APDUs for listings

    def test_removed_card_leaves_the_lists_and_comes_back(self):
        self.h.piv.remove(0)
        self.assertEqual(b64list(self.h.result(">*|\n>1:ALIASES|\n\n")), ALIASES[2:])
        self.assertEqual(self.h.sign("P PIV 00 Signing", "123456"), errors.NOT_FOUND)
        self.h.piv.insert(0)
        # before its arrival probe has run: ALIASES probes it first
        self.assertEqual(b64list(self.h.result(">*|\n>1:ALIASES|\n\n")), ALIASES)
        before = self.h.apdus()
        self.h.clock.advance(0)
        self.assertEqual(self.h.apdus(), before)  # the arrival probe found it done

    def test_alias_names_the_reader_for_every_command(self):
        self.assertEqual(self.h.result(">P PIV 01 Signing|\n>1:APDU:00A4040C05A000000308|\n\n"), "9000")
        self.assertEqual(self.h.registry.resolve("P PIV 01 Signing").name, "P 01")
        self.assertEqual(self.h.registry.resolve("CN=G OpenPGP 00 Signing,O=CloudFoxy Emulated").name, "G 00")

    def test_foxyproxy_alias_strings_are_reader_lines(self):
        """FoxyProxy 2.10's ALIASES entry (sorted ``oidName: value`` pairs)
        names the certificate, though the line protocol splits it at ``:``."""
        name = "commonName: P PIV 01 Signing, organizationName: CloudFoxy Emulated"
        self.assertEqual(self.h.chain(name), self.h.chain("P PIV 01 Signing"))
        signature = base64.b16decode(self.h.sign(name, "123456"))
        verify(self.h.chain("P PIV 01 Signing")[0], SHA256, signature)
        self.assertEqual(self.h.sign(name, "999999"), errors.BAD_PIN)  # the PIN after the name counts
        self.assertEqual(self.h.result(f">{name}|\n>1:APDU:00A4040C05A000000308|\n\n"), "9000")
        # only whole names: a part of one, or one with more after it, names nothing
        for other in ("commonName: P PIV 01", name + " x", "commonName"):
            self.assertEqual(self.h.result(f">{other}|\n>1:CHAIN|\n\n"), errors.NOT_FOUND, other)

    def test_chain_without_and_with_ca_certificates(self):
        [leaf] = self.h.chain("P PIV 00 Signing")
        self.assertEqual(x509.load_der_x509_certificate(leaf).subject.rfc4514_string(),
                         "CN=P PIV 00 Signing,O=CloudFoxy Emulated")
        pki = get_pki()
        h = Harness(ca_certs=[pki.root.cert, pki.issuer.cert])
        chain = [x509.load_der_x509_certificate(c) for c in h.chain("G OpenPGP 01 Signing")]
        self.assertEqual([c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value for c in chain],
                         ["G OpenPGP 01 Signing", "CloudFoxy Emulated Issuing CA", "CloudFoxy Emulated Root CA"])
        for child, parent in zip(chain, chain[1:]):
            child.verify_directly_issued_by(parent)
        self.assertEqual(h.chain("nope"), errors.NOT_FOUND)
        self.assertEqual(h.chain("I 00"), errors.FAILED)  # a card without certificates
        self.assertEqual(h.chain("P 00")[0], h.chain("P PIV 00 Signing")[0])  # a reader: its first certificate

    def test_listing_commands_without_an_index(self):
        self.h.dispatcher.signing = None
        self.assertEqual(self.h.results(">*|\n>1:ALIASES|\n>2:ENUM|\n>3:CHAIN|\n\n"), [errors.FAILED] * 3)
        self.assertEqual(self.h.sign("P PIV 00 Signing", "123456"), errors.FAILED)


class SignTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness()

    def test_every_alias_and_hash(self):
        for alias in ALIASES:
            [leaf] = self.h.chain(alias)
            for n in (20, 32, 48, 64):
                digest = hashlib.sha512(alias.encode()).digest()[:n]
                signature = bytes.fromhex(self.h.sign(alias, "123456", digest))
                verify(leaf, digest, signature)

    def test_named_algorithm(self):
        leaf = self.h.chain("G OpenPGP 00 Signing")[0]
        verify(leaf, SHA256, bytes.fromhex(self.h.sign("G OpenPGP 00 Signing", "123456", obj="SHA-256")))
        self.assertEqual(self.h.sign("G OpenPGP 00 Signing", "123456", obj="SHA1"), errors.MALFORMED)

    def test_reader_name_signs_with_the_first_certificate(self):
        leaf = self.h.chain("P PIV 00 Signing")[0]
        verify(leaf, SHA256, bytes.fromhex(self.h.sign("P 00", "123456")))

    def test_bad_digests(self):
        for data in ("", "zz", "00" * 31, "00" * 65):
            self.assertEqual(self.h.result(f">P PIV 00 Signing:123456|\n>1:SIGN:{data}|\n\n"), errors.MALFORMED)

    def test_unknown_and_non_signing(self):
        self.assertEqual(self.h.sign("Nobody", "123456"), errors.NOT_FOUND)
        self.assertEqual(self.h.sign("I 00", "123456"), errors.FAILED)
        self.assertEqual(self.h.sign("P PIV 00 Signing", ""), errors.BAD_PIN)
        self.assertEqual(self.h.result(">P PIV 00 Signing|\n>1:SIGN:" + SHA256.hex() + "|\n\n"), errors.BAD_PIN)

    def test_wrong_pin_is_never_presented_twice_in_a_row(self):
        card = self.h.piv.cards[0]
        self.assertEqual(self.h.sign("P PIV 00 Signing", "111111"), errors.BAD_PIN)
        self.assertEqual(card.pin_tries, 2)
        before = self.h.apdus()
        self.assertEqual(self.h.sign("P PIV 00 Authentication", "111111"), errors.BAD_PIN)  # same card
        self.assertEqual((card.pin_tries, self.h.apdus()), (2, before))  # the card saw nothing
        self.assertEqual(self.h.sign("P PIV 00 Signing", "222222"), errors.BAD_PIN)
        self.assertEqual(card.pin_tries, 1)
        self.assertNotEqual(self.h.sign("P PIV 00 Signing", "123456"), errors.BAD_PIN)
        self.assertEqual(card.pin_tries, 3)
        self.assertEqual(self.h.sign("P PIV 00 Signing", "222222"), errors.BAD_PIN)
        self.assertEqual(card.pin_tries, 2)  # forgotten after the success: presented again
        self.assertEqual(self.h.sign("P PIV 00 Signing", "222222"), errors.BAD_PIN)
        self.assertEqual(card.pin_tries, 2)
        self.assertEqual(self.h.sign("P PIV 01 Signing", "222222"), errors.BAD_PIN)  # another card: tried
        self.assertEqual(self.h.piv.cards[1].pin_tries, 2)
        self.assertEqual(self.h.result(">P 00|\n>1:RESET|\n\n")[:2], "3B")
        self.assertEqual(self.h.sign("P PIV 00 Signing", "222222"), errors.BAD_PIN)  # RESET forgets
        self.assertEqual(card.pin_tries, 1)

    def test_openpgp_wrong_pin(self):
        card = self.h.pgp.cards[1]
        self.assertEqual(self.h.sign("G OpenPGP 01 Signing", "000000"), errors.BAD_PIN)
        self.assertEqual(self.h.sign("G OpenPGP 01 Signing", "000000"), errors.BAD_PIN)
        self.assertEqual(card.pw1.tries, 2)

    def test_pins_never_reach_the_log(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.h.sign("P PIV 00 Signing", "987654")
        self.h.sign("P PIV 00 Signing", "987654")
        self.h.sign("P PIV 00 Signing", "123456")
        self.h.sign("G OpenPGP 00 Signing", "1234567890")
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("SIGN on P 00", text)
        for secret in ("987654", "123456", "1234567890", b"987654".hex(), b"123456".hex().upper()):
            self.assertNotIn(secret, text)

    def test_reset_sends_nothing_and_sign_looks_at_the_card_again(self):
        b = self.h.piv
        b.cards[1] = b._slots[1] = PivCard(serial=7, label="P")  # swapped without a removal event
        before = b.apdus
        self.assertEqual(self.h.result(">P 01|\n>1:RESET|\n\n")[:2], "3B")
        self.h.clock.advance(5)
        self.assertEqual(b.apdus, before)  # the card stays as the reset left it
        self.assertIn("P PIV 01 Signing", b64list(self.h.result(">*|\n>1:ALIASES|\n\n")))  # the cache
        self.assertEqual(self.h.sign("P PIV 01 Signing", "123456"), errors.NOT_FOUND)  # SIGN looked
        self.assertIn("P PIV 07 Signing", b64list(self.h.result(">*|\n>1:ALIASES|\n\n")))
        self.assertNotIn("P PIV 01 Signing", b64list(self.h.result(">*|\n>1:ALIASES|\n\n")))
        self.assertEqual(self.h.registry.resolve("P PIV 07 Signing").name, "P 01")

    def test_sign_right_after_a_swap_checks_the_card(self):
        b = self.h.piv
        b.cards[1] = b._slots[1] = PivCard(serial=7, label="P")
        self.h.result(">P 01|\n>1:RESET|\n\n")
        # the alias still names reader P 01, but SIGN looks at the card first
        self.assertEqual(self.h.sign("P PIV 01 Signing", "123456"), errors.NOT_FOUND)
        self.assertEqual(self.h.registry.resolve("P PIV 07 Signing").name, "P 01")
        leaf = self.h.chain("P PIV 07 Signing")[0]
        verify(leaf, SHA256, bytes.fromhex(self.h.sign("P PIV 07 Signing", "123456")))

    def test_no_probe_after_resets(self):
        before = self.h.piv.apdus
        for _ in range(5):
            results = self.h.results(">P 00|\n>1:RESET|\n>2:APDU:00200080|\n\n")
            self.assertEqual(results[1], "6D00")  # nothing selected since the reset
            self.h.clock.advance(0.7)
            self.assertEqual(self.h.result(">P 00|\n>1:APDU:00200080|\n\n"), "6D00")  # still nothing
        self.h.clock.advance(10)
        self.assertEqual(self.h.piv.apdus, before + 10)  # only the client's APDUs
        self.h.results(">*|\n>1:ENUM|\n>2:ALIASES|\n\n")
        self.assertEqual(self.h.piv.apdus, before + 10)  # listings from the cache

    def test_reprobe_tries_the_known_profile_first(self):
        self.h.pgp.sent.clear()
        self.h.result(">G 00|\n>1:RESET|\n\n")
        self.h.clock.advance(1)
        self.assertEqual(self.h.pgp.sent, [])
        self.h.sign("G OpenPGP 00 Signing", "123456")  # SIGN looks at the reset card first
        self.assertFalse([a for a in self.h.pgp.sent if "A000000308" in a])  # no PIV SELECT
        self.assertEqual(self.h.pgp.sent[0], "00A4040006D27600012401")

    def test_held_card_is_not_probed_on_arrival_but_lazily_when_free(self):
        from cloudfoxy_proxy.dispatch import Session

        self.h.piv.remove(0)
        reader = self.h.registry.get("P 00")
        bridge = Session("vpcd")
        reader.holder = bridge  # a vpcd bridge holds the card
        before = self.h.piv.apdus
        self.h.piv.insert(0)
        self.h.clock.advance(1)
        self.assertEqual(self.h.piv.apdus, before)  # no arrival probe
        self.assertNotIn("P PIV 00 Signing", b64list(self.h.result(">*|\n>1:ALIASES|\n\n")))
        self.assertEqual(self.h.piv.apdus, before)  # ENUM/ALIASES do not probe a held card either
        reader.holder = None
        aliases, enum = self.h.results(">*|\n>1:ALIASES|\n>2:ENUM|\n\n")  # the lazy probe
        self.assertEqual(b64list(aliases), ALIASES)
        self.assertIn("P 00", b64list(enum))
        probed = self.h.piv.apdus
        self.assertGreater(probed, before)
        self.h.result(">*|\n>1:ENUM|\n\n")
        self.assertEqual(self.h.piv.apdus, probed)  # once

    def test_lazy_probe_skips_a_card_a_request_holds(self):
        self.h.piv.remove(0)
        self.h.piv.insert(0)  # arrival probe due at the next clock turn
        # A request holding P 00 asks ENUM: the card is not free, so no probe
        # (no deadlock either), and the answer comes from the cache.
        results = self.h.results(">P 00|\n>1:RESET|\n>2:ENUM|\n>3:APDU:00200080|\n\n")
        self.assertNotIn("P 00", b64list(results[1]))
        self.assertEqual(results[2], "6D00")

    def test_ambiguous_alias(self):
        twin = backend(self.h.clock, "piv", "P", cards=1)
        twin.start(self.h.registry)
        self.h.backends.append(twin)
        self.h.clock.advance(0)
        self.assertEqual(self.h.sign("P PIV 00 Signing", "123456"), errors.AMBIGUOUS)
        self.assertEqual(self.h.chain("P PIV 00 Signing"), errors.AMBIGUOUS)
        self.assertEqual(self.h.result(">P PIV 00 Signing|\n>1:APDU:00A4040C05A000000308|\n\n"), errors.AMBIGUOUS)
        self.assertEqual(b64list(self.h.result(">*|\n>1:ALIASES|\n\n")).count("P PIV 00 Signing"), 2)
        self.assertNotEqual(self.h.sign("P PIV 01 Signing", "123456"), errors.AMBIGUOUS)
        twin.remove(0)
        self.assertNotIn(self.h.sign("P PIV 00 Signing", "123456"), errors.MEANING)

    def test_client_password(self):
        h = Harness(password="s3cret")
        leaf = h.chain("P PIV 00 Signing")[0]
        verify(leaf, SHA256, bytes.fromhex(h.sign("P PIV 00 Signing", "s3cret:123456")))
        before = h.apdus()
        self.assertEqual(h.sign("P PIV 00 Signing", "123456"), errors.BAD_PIN)
        self.assertEqual(h.sign("P PIV 00 Signing", "s3cret"), errors.BAD_PIN)  # no PIN
        self.assertEqual(h.sign("P PIV 00 Signing", "s3cre:123456"), errors.BAD_PIN)
        self.assertEqual(h.apdus(), before)
        self.assertEqual(h.piv.cards[0].pin_tries, 3)
        self.assertEqual(h.result(">P 00:s3cret|\n>1:APDU:00A4040C05A000000308|\n\n"), "9000")
        self.assertEqual(h.result(">P 00:123456|\n>1:APDU:00A4040C05A000000308|\n\n"), errors.BAD_PIN)


class TimingTests(SynchronousTestCase):
    """Latency, card removal mid-SIGN, the command timeout."""

    def setUp(self):
        self.h = Harness(timeout=5.0)
        self.slow = backend(self.h.clock, "piv", "S", cards=1, latency=0.5)
        self.slow.start(self.h.registry)
        self.h.backends.append(self.slow)
        self.h.clock.pump([0] + [0.5] * 20)  # the probe, APDU by APDU

    def test_sign_with_latency(self):
        self.h.send(f">S PIV 00 Signing:123456|\n>1:SIGN:{SHA256.hex()}|\n\n")
        self.h.clock.pump([0.5] * 3)  # SELECT, VERIFY, GENERAL AUTHENTICATE
        out = self.h.send("")
        leaf = self.h.chain("S PIV 00 Signing")[0]
        verify(leaf, SHA256, bytes.fromhex(out.splitlines()[0].split(":", 1)[1]))

    def test_other_requests_wait_for_the_whole_sign(self):
        other = self.h.factory.buildProtocol(None)
        t2 = StringTransport(peerAddress=LOCAL)
        other.makeConnection(t2)
        self.h.send(f">S PIV 00 Signing:123456|\n>1:SIGN:{SHA256.hex()}|\n\n")
        self.h.clock.advance(0.5)  # SELECT answered, VERIFY under way
        other.dataReceived(b">S 00|\n>9:APDU:00200080|\n\n")  # PIN status, queued behind SIGN
        self.h.clock.advance(0.5)  # VERIFY answered, GENERAL AUTHENTICATE under way
        self.assertEqual((self.h.send(""), t2.value()), ("", b""))
        self.h.clock.advance(0.5)  # the signature
        self.assertRegex(self.h.send(""), r"^>1:[0-9A-F]+\n@@\n$")
        self.assertEqual(t2.value(), b"")  # its turn only now
        self.h.clock.advance(0.5)
        self.assertEqual(t2.value(), b">9:9000\n@@\n")

    def test_card_pulled_mid_sign(self):
        self.h.send(f">S PIV 00 Signing:123456|\n>1:SIGN:{SHA256.hex()}|\n\n")
        self.h.clock.advance(0.5)  # SELECT done, VERIFY in flight
        self.slow.remove(0)
        self.h.clock.advance(0.5)
        self.assertEqual(self.h.send(""), ">1:C080\n@@\n")
        self.assertEqual(self.h.sign("S PIV 00 Signing", "123456"), errors.NOT_FOUND)  # gone with its card
        self.slow.insert(0)
        self.h.clock.pump([0] + [0.5] * 20)
        self.h.send(f">S PIV 00 Signing:123456|\n>1:SIGN:{SHA256.hex()}|\n\n")
        self.h.clock.pump([0.5] * 3)
        self.assertRegex(self.h.send(""), r"^>1:[0-9A-F]{100,}\n@@\n$")

    def test_timeout_bounds_the_whole_sequence(self):
        self.slow.latency = 2.0  # three APDUs: 6 s > 5 s
        self.h.send(f">S PIV 00 Signing:123456|\n>1:SIGN:{SHA256.hex()}|\n\n")
        self.h.clock.pump([1.0] * 5)
        self.assertEqual(self.h.send(""), ">1:C086\n@@\n")
        self.h.clock.advance(10)
        self.slow.latency = 0.0
        self.assertEqual(self.h.result(">S 00|\n>1:APDU:00A4040C05A000000308|\n\n"), "9000")  # card released
        self.assertEqual(self.h.clock.getDelayedCalls(), [])


class UnitTests(SynchronousTestCase):
    def test_parse_digest(self):
        self.assertEqual(parse_digest("AA" * 20), b"\xaa" * 20)
        self.assertEqual(parse_digest("aa bb" * 16), b"\xaa\xbb" * 16)
        for bad, algorithm in (("AA" * 21, ""), ("AAB", ""), ("AA" * 32, "SHA384"), ("AA" * 32, "MD5")):
            self.assertRaises(CardError, parse_digest, bad, algorithm)

    def test_build_chain_stops_at_the_root_and_missing_issuers(self):
        pki = get_pki()
        leaf = pki.leaf("Chain Test", "p256").cert
        self.assertEqual(build_chain(leaf, []), [leaf])
        self.assertEqual(build_chain(leaf, [pki.root.cert]), [leaf])
        self.assertEqual(build_chain(leaf, [pki.root.cert, pki.issuer.cert, leaf]),
                         [leaf, pki.issuer.cert, pki.root.cert])

    def test_load_ca_certs(self):
        import os
        import tempfile

        pki = get_pki()
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "ca.pem"), "wb") as f:
            f.write(pki.ca_pem())
        from cryptography.hazmat.primitives import serialization

        with open(os.path.join(d, "root.der"), "wb") as f:
            f.write(pki.root.cert.public_bytes(serialization.Encoding.DER))
        with open(os.path.join(d, "notes.txt"), "w") as f:
            f.write("not a certificate")
        self.assertEqual(len(load_ca_certs(os.path.join(d, "ca.pem"))), 2)
        self.assertEqual(len(load_ca_certs(d)), 3)
        for bad in (os.path.join(d, "notes.txt"), os.path.join(d, "missing")):
            self.assertRaises(ValueError, load_ca_certs, bad)


class Releasing(Counting):
    """A backend with the optional ``release(key)`` (as pcsc: has, to end
    its transaction and start its idle release): records each call and
    whether an APDU was sent after the last one."""

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        self.released = []

    def release(self, key):
        self.released.append((key, self.apdus))


class ProbeReleaseTests(SynchronousTestCase):
    def test_the_certificate_probe_releases_the_card_like_a_request(self):
        """The proxy's own probe of an arriving card ends its turn through
        the backend's ``release`` too: without it a pcsc: card stayed inside
        the probe's PC/SC transaction, and every other program's
        SCardConnect waited for ever."""
        clock = Clock()
        registry = ReaderRegistry()
        index = CertIndex(registry, clock, 15.0)
        index.start()
        made = emulated.from_url("emulated:?type=piv&cards=1&prefix=R")(clock)
        b = Releasing(clock, made.cards, prefix="R", kind="piv")
        b.start(registry)
        clock.advance(0)
        self.assertGreater(b.apdus, 0)  # the probe ran on the card
        self.assertTrue(b.released, "the probe never released the card")
        self.assertEqual(b.released[-1][1], b.apdus, "APDUs were sent after the last release")
        self.assertFalse(registry.readers[0].queue.busy)
