"""``foxyproxy-trace FILE``: a JSON-lines ``--trace`` printed for people
(docs/trace.md "Reading a trace").

One block per exchange::

    17:29:18.115818 Emulated 00  line alice 127.0.0.1:5000  0.080 ms
      C: 00 A4 04 00  SELECT  Lc=9 Le=256
         0000  A0 00 00 03 08 00 00 10 00                       .........
      R: SW1/SW2=9000 (normal processing: no error)  Lr=2
         0000  6F 00                                            o.

Filters: ``--reader GLOB`` (repeatable), ``--since``/``--until`` (ISO
8601 UTC, as in the trace, or a prefix of it such as ``17:30``),
``--ins XX`` (hex, repeatable).  ``--follow`` keeps reading as the proxy
appends (like ``tail -f``; stopped with Ctrl-C).  Exit status 0, 1 when
the file cannot be read, 2 on bad options; a line that is not a trace
record is reported on stderr and skipped.
"""

import argparse
import fnmatch
import json
import sys
import time

from .apdu import BadLength, parse_command
from .apdu_names import CHALLENGE_INS, instruction_name, status_meaning
from .errors import MEANING


def hexdump(data, indent="     "):
    """Lines of ``offset  hex (16 a line)  ASCII``."""
    out = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        out.append(f"{indent}{i:04X}  {' '.join(f'{b:02X}' for b in chunk):<47}  {text}")
    return out


def describe(record):
    """The lines printed for one record (a dict of trace.as_dict)."""
    when = str(record.get("time", ""))
    head = (f"{when[11:26] or when} {record.get('reader')}  {record.get('frontend')} "
            f"{record.get('identity') or '-'} {record.get('peer') or '-'}  {record.get('ms', 0):.3f} ms")
    lines = [head]
    if record.get("event") == "reset":
        atr = record.get("atr")
        lines.append(f"  RESET  ATR {_spaced(atr)}" if atr else f"  RESET  {_result(record['result'])}")
        return lines
    try:
        command = bytes.fromhex(record.get("command", ""))
    except ValueError:
        return lines + ["  C: (not hex)"]
    hidden = record.get("redacted", 0)
    lines.append("  C: " + _command_line(command, hidden))
    if hidden:
        lines.append(f"     [{hidden} data bytes redacted]")
    else:
        data = _data(command)
        if data:
            lines += hexdump(data)
    if "result" in record:
        lines.append("  R: " + _result(record["result"]))
        return lines
    try:
        response = bytes.fromhex(record.get("response", ""))
    except ValueError:
        return lines + ["  R: (not hex)"]
    if len(response) < 2:
        return lines + ["  R: (no status word)"]
    sw1, sw2 = response[-2], response[-1]
    note = ""
    if len(command) > 1 and command[1] in CHALLENGE_INS:
        note = "  [random challenge: not replayable]"
    lines.append(f"  R: SW1/SW2={sw1:02X}{sw2:02X} ({status_meaning(sw1, sw2)})  Lr={len(response) - 2}{note}")
    lines += hexdump(response[:-2])
    return lines


def _spaced(text):
    return " ".join(text[i:i + 2] for i in range(0, len(text), 2))


def _result(code):
    return f"{code} ({MEANING.get(code, 'result code')})"


def _data(command):
    try:
        return parse_command(command).data
    except BadLength:
        return command[4:]


def _command_line(command, hidden):
    if len(command) < 4:
        return command.hex().upper() + "  (shorter than a command header)"
    header = " ".join(f"{b:02X}" for b in command[:4])
    name = instruction_name(command[1])
    if hidden:  # the data field was cut out: Lc is the byte after the header
        lc = command[4] if len(command) > 4 else 0
        return f"{header}  {name}  Lc={lc}"
    try:
        parsed = parse_command(command)
    except BadLength:
        return f"{header}  {name}  (not one of the four ISO 7816-4 cases: {len(command)} bytes)"
    parts = [f"{header}  {name}"]
    if parsed.data:
        parts.append(f"Lc={len(parsed.data)}")
    if parsed.ne is not None:
        parts.append(f"Le={parsed.ne}")
    return "  ".join(parts)


def _matches(record, args):
    if args.reader and not any(fnmatch.fnmatchcase(str(record.get("reader")), p) for p in args.reader):
        return False
    when = str(record.get("time", ""))
    clock = when[11:]
    for bound, later in ((args.since, True), (args.until, False)):
        if bound:
            value = clock if ":" in bound[:3] else when  # a time of day, or a full timestamp
            if (value[:len(bound)] < bound) if later else (value[:len(bound)] > bound):
                return False
    if args.ins:
        command = str(record.get("command", ""))
        if record.get("event") != "apdu" or command[2:4].upper() not in args.ins:
            return False
    return True


def _lines(f, follow):
    while True:
        line = f.readline()
        if line:
            if line.endswith("\n") or not follow:
                yield line
                continue
            while not line.endswith("\n"):  # a line the proxy is still writing
                time.sleep(0.1)
                line += f.readline()
            yield line
        elif follow:
            time.sleep(0.2)
        else:
            return


def main(argv=None, out=None):
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="foxyproxy-trace", description="Print a --trace file (JSON lines) "
                                     "decoded: ISO 7816-4 instruction names, Lc/Le, data, status words.")
    parser.add_argument("file")
    parser.add_argument("--reader", action="append", default=[], metavar="GLOB",
                        help="only readers matching this glob (repeatable)")
    parser.add_argument("--since", help="only records at or after this time (UTC, e.g. 2026-12-07T17:30 or 17:30)")
    parser.add_argument("--until", help="only records up to this time (same forms)")
    parser.add_argument("--ins", action="append", default=[], metavar="XX",
                        help="only this instruction byte, hex (repeatable), e.g. A4")
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing what the proxy appends")
    args = parser.parse_args(argv)
    try:
        args.ins = {f"{int(i, 16):02X}" for i in args.ins}
    except ValueError:
        parser.error("--ins takes a hex byte, e.g. A4")
    if args.file.lower().endswith(".pcapng"):
        sys.stderr.write("foxyproxy-trace: a pcapng trace is read with Wireshark or tshark; "
                         "this prints JSON-lines traces\n")
        return 1
    try:
        f = open(args.file, encoding="utf-8")
    except OSError as e:
        sys.stderr.write(f"foxyproxy-trace: {args.file}: {e.strerror}\n")
        return 1
    with f:
        try:
            for n, line in enumerate(_lines(f, args.follow), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError
                except ValueError:
                    sys.stderr.write(f"foxyproxy-trace: line {n} is not a trace record, skipped\n")
                    continue
                if _matches(record, args):
                    out.write("\n".join(describe(record)) + "\n")
                    out.flush()
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:
            return 0
    return 0


def main_exit():
    """The console script: :func:`main`'s status as the exit status."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
