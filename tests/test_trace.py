"""``--trace`` in memory (docs/trace.md): the recorder's hook in the
dispatcher, the two file formats, redaction on every emulated card type,
the bounded buffer, live watchers, replay, the viewer and the options."""

import io
import json
import os

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from cloudfoxy_proxy import errors, tap
from cloudfoxy_proxy.apdu import secret_span, secure_messaging
from cloudfoxy_proxy.backends.emulated import EmulatedBackend, from_url
from cloudfoxy_proxy.cards.replay import ReplayCard, load
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.parser import Request, make_command
from cloudfoxy_proxy.registry import ReaderRegistry
from cloudfoxy_proxy.trace import (
    GSMTAP_PORT, JsonLinesFile, TraceService, Tracer, as_dict, gsmtap_frame, read_records, trace_file,
)
from cloudfoxy_proxy import trace_view

PIN = b"123456"
PIN_HEX = PIN.hex().upper()

#: Per card type: the commands that end in a VERIFY of the PIN 123456 that the card accepts.
VERIFY = {
    "iso7816": (["0020000006" + PIN_HEX], None),  # no PIN on this card: 6D00, still redacted
    "piv": (["00A4040009A00000030800001000", "0020008008" + PIN_HEX + "FFFF"], "9000"),
    "openpgp": (["00A4040006D27600012401", "0020008106" + PIN_HEX], "9000"),
    "ica": (["0020008106" + PIN_HEX], "9000"),
    "postsignum": (["0020001006" + PIN_HEX], "9000"),
}


def rig(tmp_path, kind="iso7816", unredacted=False, patterns=(), cards=1):
    clock = Clock()
    registry = ReaderRegistry()
    backend = from_url(f"emulated:?type={kind}&cards={cards}")(clock)
    backend.start(registry)
    dispatcher = Dispatcher(registry, clock)
    dispatcher.trace = Tracer(patterns, unredacted)
    files = [trace_file(str(tmp_path / "t.jsonl"), unredacted), trace_file(str(tmp_path / "t.pcapng"), unredacted)]
    service = TraceService(dispatcher.trace, files, clock)
    dispatcher.trace.files += 1  # as startService does, without the thread: tests call flush()
    return dispatcher, service


def run(dispatcher, reader, *apdus, reset=False, session=None):
    commands = ([make_command(["0", "RESET"])] if reset else []) + [
        make_command([str(i + 1), "APDU", a]) for i, a in enumerate(apdus)]
    return [r for _, r in dispatcher.execute(Request(reader, None, commands), session or Session("127.0.0.1:9"))]


def lines(tmp_path):
    return [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", sorted(VERIFY))
def test_no_pin_in_any_trace_on_every_card_type(tmp_path, kind):
    dispatcher, service = rig(tmp_path, kind)
    apdus, expected = VERIFY[kind]
    results = run(dispatcher, "Emulated 00", *apdus)
    if expected is not None:
        assert results[-1] == expected  # the card took the PIN
    service.flush()
    for name in ("t.jsonl", "t.pcapng"):
        data = (tmp_path / name).read_bytes()
        assert PIN not in data and PIN_HEX.encode() not in data and PIN.hex().encode() not in data, name
    verify = lines(tmp_path)[-1]
    assert verify["command"] == apdus[-1][:10] and verify["redacted"] == len(bytes.fromhex(apdus[-1])) - 5
    assert os.stat(tmp_path / "t.jsonl").st_mode & 0o777 == 0o600


def test_unredacted_keeps_the_pin(tmp_path):
    dispatcher, service = rig(tmp_path, "piv", unredacted=True)
    run(dispatcher, "Emulated 00", *VERIFY["piv"][0])
    service.flush()
    assert PIN_HEX in (tmp_path / "t.jsonl").read_text()
    assert PIN in (tmp_path / "t.pcapng").read_bytes()


@pytest.mark.parametrize("apdu, span", [
    ("0020008106" + PIN_HEX, (5, 6)),  # VERIFY
    ("002400810C" + PIN_HEX * 2, (5, 12)),  # CHANGE REFERENCE DATA
    ("002C008106" + PIN_HEX, (5, 6)),  # RESET RETRY COUNTER
    ("0CB0000004", None),  # secure messaging, no data
    ("0CD6000003AABBCC", (5, 3)),  # secure messaging (first interindustry class)
    ("84820000021122", (5, 2)),  # GlobalPlatform secure channel class
    ("60D60000020102", (5, 2)),  # further interindustry class, SM bit
    ("00D6000003AABBCC", None),  # plain UPDATE BINARY stays
    ("00200081000006" + PIN_HEX, (7, 6)),  # extended length
    ("00200081FF01", (4, 2)),  # not a well-formed APDU: everything after the header
])
def test_secret_span(apdu, span):
    assert secret_span(bytes.fromhex(apdu)) == span


def test_secure_messaging_bits():
    assert [secure_messaging(c) for c in (0x00, 0x04, 0x08, 0x0C, 0x40, 0x60, 0x80, 0x84)] == [
        False, True, True, True, False, True, False, True]


def test_records_name_reader_frontend_identity_peer_and_resets(tmp_path):
    dispatcher, service = rig(tmp_path, cards=2)
    assert run(dispatcher, "Emulated 01", "00A4000C023F00", reset=True) == [
        dispatcher.registry.get("Emulated 01").info.atr.hex().upper(), "9000"]
    service.flush()
    reset, select = lines(tmp_path)
    assert reset["event"] == "reset" and reset["atr"] == dispatcher.registry.get("Emulated 01").info.atr.hex().upper()
    assert select == {**select, "event": "apdu", "reader": "Emulated 01", "frontend": "line",
                      "identity": "anonymous", "peer": "127.0.0.1:9", "command": "00A4000C023F00",
                      "response": "9000"}
    assert select["time"].endswith("Z") and select["ms"] >= 0


def test_an_error_result_is_recorded_and_a_refused_command_is_not(tmp_path):
    dispatcher, service = rig(tmp_path)
    dispatcher.registry.readers[0].backend.remove(0)
    assert run(dispatcher, "Emulated 00", "00A4000C023F00") == [errors.NO_CARD]
    assert run(dispatcher, "Nobody", "00A4000C023F00") == [errors.NOT_FOUND]
    service.flush()
    [record] = lines(tmp_path)
    assert record["result"] == errors.NO_CARD and "response" not in record


def test_trace_readers_selects(tmp_path):
    dispatcher, service = rig(tmp_path, patterns=["*01"], cards=2)
    run(dispatcher, "Emulated 00", "00A4000C023F00")
    run(dispatcher, "Emulated 01", "00B0000004")
    service.flush()
    assert [r["reader"] for r in lines(tmp_path)] == ["Emulated 01"]


def test_a_full_buffer_drops_counts_and_warns_once_a_minute(tmp_path):
    from twisted.logger import globalLogPublisher

    dispatcher, service = rig(tmp_path)
    dispatcher.trace.max_buffer = 2
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        service.startService()  # the thread flushes at once: keep it from doing so
        service._stop.set()
        service._thread.join(5)
        for _ in range(5):
            run(dispatcher, "Emulated 00", "00A4000C023F00")
        assert dispatcher.trace.dropped == 3
        service.clock.advance(60)
        warned = [e for e in seen if "records dropped" in e.get("log_format", "")]
        assert len(warned) == 1 and warned[0]["n"] == 3
        service.clock.advance(60)
        assert len([e for e in seen if "records dropped" in e.get("log_format", "")]) == 1
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert len(lines(tmp_path)) == 2  # what fitted was still written


def test_live_watcher_gets_redacted_records_of_its_reader(tmp_path):
    dispatcher, _service = rig(tmp_path, "piv", cards=2)
    got = []
    stop = dispatcher.trace.watch("Emulated 00", got.append)
    run(dispatcher, "Emulated 00", *VERIFY["piv"][0])
    run(dispatcher, "Emulated 01", "00B0000004")
    assert [g["command"] for g in got] == ["00A4040009A00000030800001000", "0020008008"]
    assert got[1]["redacted"] == 8
    stop()
    run(dispatcher, "Emulated 00", "00B0000004")
    assert len(got) == 2 and not dispatcher.trace.watchers


def test_pcapng_frame_is_gsmtap_sim_in_udp_4729():
    frame = gsmtap_frame(bytes.fromhex("00A4000C023F009000"))
    assert frame[0] == 0x45 and frame[9] == 17  # IPv4, UDP
    assert int.from_bytes(frame[22:24], "big") == GSMTAP_PORT
    gsmtap = frame[28:44]
    assert gsmtap[0] == 2 and gsmtap[1] == 4 and gsmtap[2] == 4 and gsmtap[12] == 0  # v2, 16 bytes, SIM, APDU
    assert frame[44:] == bytes.fromhex("00A4000C023F009000")


# -- replay ------------------------------------------------------------------------------


def recorded(tmp_path, kind="iso7816"):
    dispatcher, service = rig(tmp_path, kind)
    run(dispatcher, "Emulated 00", "00A4000C023F00", "00B0000004", "0084000008", reset=True)
    service.flush()
    return str(tmp_path / "t.jsonl")


def test_strict_replay_answers_in_order_and_fails_on_divergence(tmp_path):
    path = recorded(tmp_path)
    original = lines(tmp_path)
    make = from_url(f"emulated:?replay={path}")
    backend = make(Clock())
    registry = ReaderRegistry()
    backend.start(registry)
    dispatcher = Dispatcher(registry, Clock())
    assert registry.get("Emulated 00").info.atr.hex().upper() == original[0]["atr"]
    assert run(dispatcher, "Emulated 00", "00A4000C023F00", "00B0000004", reset=True) == [
        original[0]["atr"], "9000", original[2]["response"]]
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        assert run(dispatcher, "Emulated 00", "00B0000008", "0084000008") == [errors.FAILED, errors.FAILED]
    finally:
        globalLogPublisher.removeObserver(seen.append)
    [line] = [e for e in seen if "diverged" in e.get("log_format", "")]
    assert line["command"] == "00B0000008" and "0084000008" in line["recorded"] and line["number"] == 3


def test_lookup_replay_matches_command_bytes_in_any_order(tmp_path):
    path = recorded(tmp_path)
    original = lines(tmp_path)
    backend = from_url(f"emulated:?replay={path}&mode=lookup")(Clock())
    registry = ReaderRegistry()
    backend.start(registry)
    dispatcher = Dispatcher(registry, Clock())
    assert run(dispatcher, "Emulated 00", "0084000008", "00A4000C023F00") == [
        original[3]["response"], "9000"]
    assert run(dispatcher, "Emulated 00", "00A4000CFF") == [errors.FAILED]


def test_replay_of_a_redacted_verify_matches_any_pin_of_that_length(tmp_path):
    dispatcher, service = rig(tmp_path, "piv")
    run(dispatcher, "Emulated 00", *VERIFY["piv"][0], reset=True)
    service.flush()
    card = ReplayCard(load(str(tmp_path / "t.jsonl"))[1])
    card.reset()
    assert card.transmit(bytes.fromhex(VERIFY["piv"][0][0]))[-2:] == b"\x90\x00"
    assert card.transmit(bytes.fromhex("0020008008" + "39" * 6 + "FFFF")) == b"\x90\x00"


@pytest.mark.parametrize("query, message", [
    ("replay={missing}", "cannot read it"),
    ("replay={pcapng}", "JSON-lines"),
    ("replay={path}&mode=fast", "mode='fast'"),
    ("replay={path}&reader=Other", "no records of reader 'Other'"),
    ("replay={path}&type=piv", "not type="),
    ("mode=strict", "are for replay=FILE"),
])
def test_replay_url_errors(tmp_path, query, message):
    path = recorded(tmp_path)
    url = "emulated:?" + query.format(missing=tmp_path / "none", pcapng=tmp_path / "t.pcapng", path=path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        from_url(url)


def test_replay_needs_a_reset_for_the_atr():
    with pytest.raises(ValueError, match="no reset"):
        ReplayCard([{"event": "apdu", "command": "00B0000004", "response": "9000"}])


# -- reading -----------------------------------------------------------------------------


def test_viewer_prints_names_lengths_data_and_meanings(tmp_path):
    path = recorded(tmp_path)
    dispatcher, service = rig(tmp_path, "piv")
    run(dispatcher, "Emulated 00", *VERIFY["piv"][0])
    service.flush()
    out = io.StringIO()
    assert trace_view.main([path], out=out) == 0
    text = out.getvalue()
    assert "00 A4 00 0C  SELECT  Lc=2" in text and "3F 00" in text
    assert "SW1/SW2=9000 (normal processing: no error)" in text
    assert "GET CHALLENGE  Le=8" in text and "random challenge: not replayable" in text
    assert "VERIFY  Lc=8" in text and "[8 data bytes redacted]" in text
    assert "RESET  ATR 3B" in text
    out = io.StringIO()
    trace_view.main([path, "--ins", "b0"], out=out)
    assert "READ BINARY" in out.getvalue() and "SELECT" not in out.getvalue()
    out = io.StringIO()
    trace_view.main([path, "--reader", "Nothing*"], out=out)
    assert out.getvalue() == ""


def test_viewer_skips_lines_that_are_not_records(tmp_path, capsys):
    path = tmp_path / "x.jsonl"
    path.write_text('not json\n{"event":"apdu","command":"00B0000004","response":"6D00"}\n')
    out = io.StringIO()
    assert trace_view.main([str(path)], out=out) == 0
    assert "checking error: instruction code not supported or invalid" in out.getvalue()
    assert "line 1 is not a trace record" in capsys.readouterr().err
    assert trace_view.main([str(tmp_path / "missing")]) == 1


def test_read_records_names_the_bad_line():
    with pytest.raises(ValueError, match="line 2"):
        list(read_records(['{"event":"reset","atr":"3B00"}', "[1]"]))


# -- options -----------------------------------------------------------------------------


def options(*args):
    config = tap.Options()
    config.parseOptions(list(args))
    return config


def test_trace_options(tmp_path):
    config = options("--trace", str(tmp_path / "a.jsonl"), "--trace", str(tmp_path / "b.pcapng"),
                     "--trace-readers", "Emulated 0*", "--trace-unredacted")
    assert config["trace"] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.pcapng")]
    assert config["trace-readers"] == ["Emulated 0*"] and config["trace-unredacted"]
    service = tap.makeService(config, Clock())
    traced = [s for s in service if isinstance(s, TraceService)]
    assert len(traced) == 1 and [type(f).__name__ for f in traced[0].files] == ["JsonLinesFile", "PcapngFile"]
    assert traced[0].tracer is service.dispatcher.trace and service.dispatcher.signing.trace is traced[0].tracer
    assert options()["trace"] == [] and tap.makeService(options(), Clock()).dispatcher.trace is None


@pytest.mark.parametrize("args, message", [
    (["--trace-readers", "x"], "--trace-readers is given without --trace"),
    (["--trace-unredacted"], "--trace-unredacted is given without --trace"),
    (["--trace", "/nonexistent/dir/t.jsonl"], "--trace '/nonexistent/dir/t.jsonl': cannot open it"),
])
def test_trace_option_errors(args, message):
    with pytest.raises(usage.UsageError, match=message):
        options(*args)


def test_as_dict_of_a_reset_error():
    record = (0.5, "R", "line", None, "", "RESET", None, errors.UPSTREAM, 0.001)
    assert as_dict(record) == {"time": "1970-01-01T00:00:00.500000Z", "reader": "R", "frontend": "line",
                               "identity": None, "peer": "", "event": "reset", "ms": 1.0, "result": "C086"}


def test_card_error_keeps_its_code_in_replay():
    card = ReplayCard([{"event": "reset", "atr": "3B00"},
                       {"event": "apdu", "command": "00B0000004", "result": "C086"}])
    card.reset()
    with pytest.raises(CardError) as e:
        card.transmit(bytes.fromhex("00B0000004"))
    assert e.value.code == errors.UPSTREAM


def test_emulated_backend_kind_is_replay(tmp_path):
    backend = from_url(f"emulated:?replay={recorded(tmp_path)}&prefix=Replayed")(Clock())
    assert isinstance(backend, EmulatedBackend) and backend.name(0) == "Replayed 00"


def test_json_lines_are_what_as_dict_gives(tmp_path):
    """The hand-written JSON-lines formatter and as_dict agree, record for record."""
    dispatcher, service = rig(tmp_path, "piv")
    run(dispatcher, "Emulated 00", *VERIFY["piv"][0], "00B0000004", reset=True)
    dispatcher.registry.readers[0].backend.remove(0)
    run(dispatcher, "Emulated 00", "00B0000004", reset=True)
    service.flush()
    got = lines(tmp_path)
    assert len(got) == 6
    written = list(dispatcher.trace.queue)  # emptied by flush: rebuild from the file's own fields
    assert not written
    for record in got:
        event = "RESET" if record["event"] == "reset" else "APDU"
        command = None if event == "RESET" else bytes.fromhex(record["command"])
        result = record.get("result") or record.get("response") or record.get("atr")
        again = as_dict((0.0, record["reader"], record["frontend"], record["identity"], record["peer"],
                         event, command, result, record["ms"] / 1000), unredacted=True)
        assert {k: v for k, v in again.items() if k != "time"} == {
            k: v for k, v in record.items() if k not in ("time", "redacted")}


def test_trace_options_from_the_config_file(tmp_path):
    config_path = tmp_path / "proxy.toml"
    config_path.write_text(f'trace = ["{tmp_path / "a.jsonl"}"]\ntrace-readers = ["Emulated 01"]\n'
                           'trace-unredacted = true\n')
    config = options("--config", str(config_path))
    assert config["trace"] == [str(tmp_path / "a.jsonl")] and config["trace-readers"] == ["Emulated 01"]
    assert config["trace-unredacted"]


def test_a_malformed_command_between_card_commands_is_not_a_card_exchange(tmp_path):
    dispatcher, service = rig(tmp_path)
    request = Request("Emulated 00", None, [make_command(["1", "APDU", "00A4000C023F00"]),
                                            make_command(["2", "APDU", "ZZ"]),
                                            make_command(["3", "APDU", "00B0000004"])])
    results = [r for _, r in dispatcher.execute(request, Session("127.0.0.1:9"))]
    assert results[1] == errors.MALFORMED
    service.flush()
    assert [r["command"] for r in lines(tmp_path)] == ["00A4000C023F00", "00B0000004"]


def test_json_lines_caches_give_each_record_its_own_line():
    """The formatter's caches (per names and command, per response) never
    give a record another record's text: names alternating commands, a
    VERIFY (redacted) between repeated commands, result codes after a
    status word, resets, durations from 0 to over a second; every command
    and response a new object, as the proxy's are."""
    def fresh(hex_):
        return bytes(bytearray.fromhex(hex_))

    t = 1765000000.25
    a = ("Emulated 00", "line", "alice", "127.0.0.1:5000")
    b = ("Emulated 01", "api", None, "[::1]:6000")
    records = []
    for n, (names, event, command, result, seconds) in enumerate([
            (a, "APDU", "00A4040000", "9000", 0.000123),
            (b, "APDU", "00A4040000", "9000", 0.0),
            (a, "APDU", "00B0000004", "010203049000", 0.0015),
            (a, "APDU", "002000800431323334", "63C2", 0.000200),
            (a, "APDU", "00B0000004", "C086", 1.5),
            (b, "APDU", "00B0000004", "9000", 0.000999),
            (a, "RESET", None, "3B8A8001466F7879456D7550495631", 0.002),
            (a, "APDU", "00B0000004", "9000", 0.000050),
            (b, "RESET", None, "C080", 0.01),
            (a, "APDU", "002000800431323334", "9000", 0.000300),
            (a, "APDU", "00A4040000", "9000", 0.000400)]):
        records.append((t + n * 0.1234567, *names, event, None if command is None else fresh(command),
                        (bytes.fromhex(result).hex().upper() if not errors.is_error(result) else result[:2] + result[2:]),
                        seconds))
    for unredacted in (False, True):
        f = JsonLinesFile(os.devnull, unredacted)
        text = f.lines(iter(records)) + f.lines(iter(records))  # the second batch from the caches
        got = [json.loads(line) for line in text.splitlines()]
        assert [list(o.items()) for o in got] == [list(as_dict(r, unredacted).items()) for r in records * 2]
    assert "31323334" not in JsonLinesFile(os.devnull).lines(iter(records))
