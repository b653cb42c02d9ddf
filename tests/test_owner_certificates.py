"""Certificates at the owner (signing/upstream.py, CertIndex), in memory: a
fake tcp:// backend with an owner id answers ENUM, ALIASES, CHAIN and SIGN
as an owner's index does; the front's index never sends it an APDU."""

import base64
import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.interfaces import ReaderInfo
from cloudfoxy_proxy.parser import make_command
from cloudfoxy_proxy.registry import ReaderRegistry
from cloudfoxy_proxy.signing.index import CertIndex

_KEY = ec.generate_private_key(ec.SECP256R1())


def certificate(cn, issuer=None):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
            .public_key(_KEY.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
            .sign(_KEY, hashes.SHA256()))
    return cert


def b64(text):
    return base64.b64encode(text.encode()).decode()


def der64(cert):
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


class FakeOwner:
    """A tcp:// backend whose upstream has an owner id: ``cards`` maps an
    upstream reader name to its certificates (CardCertificates' x509, in
    order); ``asked`` records every ask()."""

    def __init__(self, cards, issuer):
        self.owner = "rack1"
        self.where = "tcp://owner:4001"
        self.cards = cards
        self.issuer = issuer
        self.asked = []

    def description(self):
        return self.where

    def transmit(self, key, apdu):
        raise AssertionError(f"an APDU went to the owner's card {key}")

    reset = transmit

    def _alias(self, cert):
        return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    def ask(self, commands, reader=None, pin=None):
        self.asked.append((tuple(commands), reader, pin))
        out = []
        for command in commands:
            name = command.split(":")[0]
            if name == "ENUM":
                out.append("|".join(b64(r) for r, certs in self.cards.items() if certs))
            elif name == "ALIASES":
                out.append("|".join(b64(self._alias(c)) for certs in self.cards.values() for c in certs))
            elif name == "CHAIN":
                found = self.cards.get(reader, [])[:1] or [
                    c for certs in self.cards.values() for c in certs
                    if reader in (self._alias(c), c.subject.rfc4514_string())]
                out.append(":".join(der64(c) for c in found[:1] + [self.issuer]) if found else errors.NOT_FOUND)
            elif name == "SIGN":
                out.append("C085" if pin != "1234" else "ABCDEF")
            else:
                out.append(errors.FAILED)
        return succeed(out)


class OwnerCertificateTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.registry = ReaderRegistry()
        issuer = certificate("Issuer CA")
        self.sign1, self.auth1 = certificate("P 00 Signing", issuer.subject), certificate("P 00 Auth", issuer.subject)
        self.sign2 = certificate("P 01 Signing", issuer.subject)
        self.issuer = issuer
        self.backend = FakeOwner({"P 00": [self.sign1, self.auth1], "P 01": [self.sign2], "I 00": []}, issuer)
        self.index = CertIndex(self.registry, self.clock)
        self.index.start()
        self.registry.update(self.backend, [ReaderInfo(k, "rack1/" + k) for k in self.backend.cards])
        self.clock.advance(0)

    def command(self, name, reader="*", data=""):
        from cloudfoxy_proxy.parser import Request

        request = Request(reader, None, [])
        return self.successResultOf(succeed(None).addCallback(
            lambda _: self.index.command(name, make_command(["1", name, data]), request)))

    def test_aliases_become_reader_aliases_without_an_apdu(self):
        self.assertEqual(self.registry.resolve("P 00 Auth").name, "rack1/P 00")
        self.assertEqual(self.registry.resolve("P 01 Signing").name, "rack1/P 01")
        self.assertEqual(self.registry.resolve(self.auth1.subject.rfc4514_string()).name, "rack1/P 00")
        # one ENUM+ALIASES, then CHAIN per reader with certificates, and per other alias
        self.assertEqual(self.backend.asked[0], (("ENUM", "ALIASES"), None, None))
        self.assertEqual(sorted(r for c, r, _ in self.backend.asked[1:]), ["P 00", "P 00 Auth", "P 01"])

    def test_enum_aliases_chain_from_the_owner(self):
        self.assertEqual(self.command("ENUM"), f"{b64('rack1/P 00')}|{b64('rack1/P 01')}")
        self.assertEqual(self.command("ALIASES"), "|".join(b64(a) for a in ("P 00 Signing", "P 00 Auth",
                                                                             "P 01 Signing")))
        self.assertEqual(self.command("CHAIN", "P 00 Auth"), f"{der64(self.auth1)}:{der64(self.issuer)}")
        self.assertEqual(self.command("CHAIN", "rack1/P 01"), f"{der64(self.sign2)}:{der64(self.issuer)}")
        self.assertEqual(self.command("CHAIN", "rack1/I 00"), errors.FAILED)  # no certificate there

    def test_unchanged_owner_costs_one_request(self):
        before = len(self.backend.asked)
        self.command("ENUM")
        self.assertEqual(self.backend.asked[before:], [(("ENUM", "ALIASES"), None, None)])

    def test_a_changed_card_is_asked_again(self):
        new = certificate("P 01 New", self.issuer.subject)
        self.backend.cards["P 01"] = [new]
        before = len(self.backend.asked)
        self.assertEqual(self.command("CHAIN", "P 01 New"), f"{der64(new)}:{der64(self.issuer)}")
        self.assertEqual([r for _, r, _ in self.backend.asked[before + 1:]], ["P 01"])
        self.assertRaises(errors.CardError, self.registry.resolve, "P 01 Signing")

    def test_sign_goes_to_the_owner(self):
        reader = self.registry.resolve("P 00 Auth")
        digest = hashlib.sha256(b"x").hexdigest()
        d = self.index.sign(reader, "P 00 Auth", "1234", digest)
        self.assertEqual(self.successResultOf(d), bytes.fromhex("ABCDEF"))
        # the second certificate: named by its subject at the owner
        self.assertEqual(self.backend.asked[-1], ((f"SIGN:{digest}",), self.auth1.subject.rfc4514_string(), "1234"))
        d = self.index.sign(reader, "rack1/P 00", "1234", digest, "SHA256")
        self.successResultOf(d)
        self.assertEqual(self.backend.asked[-1], ((f"SIGN:{digest}:SHA256",), "P 00", "1234"))
        self.successResultOf(self.index.sign(reader, "P 00 Signing", "1234", digest))
        self.assertEqual(self.backend.asked[-1][1], self.sign1.subject.rfc4514_string())  # the owner finds it
        f = self.failureResultOf(self.index.sign(reader, "P 00 Signing", "9999", digest), CardError)
        self.assertEqual(f.value.code, errors.BAD_PIN)
        self.assertRaises(CardError, self.index.sign, reader, "P 00 Signing", "1234", "abc")  # C084 here

    def test_readers_without_owner_id_are_probed_as_before(self):
        self.backend.owner = None
        other = FakeOwner({}, self.issuer)
        other.owner = None
        sent = []
        other.transmit = lambda key, apdu: sent.append(apdu) or succeed(b"\x6a\x82")
        self.registry.update(other, [ReaderInfo("Old 00", "Old 00")])
        self.clock.advance(0)
        self.assertTrue(sent)  # the arrival probe: SELECTs through the hop

    def test_owner_that_cannot_answer_keeps_what_it_said(self):
        from twisted.logger import globalLogPublisher, formatEvent

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.backend.ask = lambda commands, reader=None, pin=None: succeed([errors.UPSTREAM] * len(commands))
        for _ in range(3):
            self.assertEqual(self.command("ENUM"), f"{b64('rack1/P 00')}|{b64('rack1/P 01')}")
        self.assertEqual(self.registry.resolve("P 00 Auth").name, "rack1/P 00")
        said = [formatEvent(e) for e in events if "asking the certificates" in formatEvent(e)]
        self.assertEqual(len(said), 1, said)  # once until it answers again
