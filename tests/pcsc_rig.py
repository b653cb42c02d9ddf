"""PC/SC test rig: a real pcscd with vsmartcard's vpcd driver and virtual cards.

No hardware is needed.  The pieces (all Debian packages):

* ``pcscd``            -- pcsc-lite daemon, started here in the foreground
                          (``pcscd -f``) as a child process.
* ``vsmartcard-vpcd``  -- the pcscd driver.  ``/etc/reader.conf.d/vpcd``
                          declares one reader with 2 slots; pcscd shows them
                          as ``Virtual PCD 00 00`` and ``Virtual PCD 00 01``.
                          The driver *listens* (on all interfaces) on TCP
                          port 35963 + slot and waits for a virtual card.
* ``vsmartcard-vpicc`` -- ``vicc``, the virtual card (Python).  It connects to
                          vpcd's port; while it is connected the slot has a
                          card, when it exits the card is removed.

``vicc`` imports ``virtualsmartcard`` from
``/usr/lib/python3/site-packages/virtualsmartcard`` (a path not on any
interpreter's sys.path) and needs ``Crypto`` (pycryptodome), so it is run
with the current interpreter (whose environment gets pycryptodome from
:func:`ensure_packages`) and that directory on ``PYTHONPATH``.

vicc is started through a tiny launcher that sets TCP_QUICKACK (see
:data:`VICC_QUICKACK_LAUNCHER`): without it every APDU costs ~44 ms.

Plain stdlib + pyscard; no Twisted.  Every wait is bounded in time.  The
stdout/stderr of every child goes to a log file in :attr:`PcscRig.log_dir`.

CLI::

    python tests/pcsc_rig.py up      # pcscd + 2 cards until Ctrl-C / SIGTERM
    python tests/pcsc_rig.py check   # start, smoke-test with pyscard, stop
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import importlib
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

__all__ = [
    "DEBIAN_PACKAGES",
    "PcscRig",
    "RigError",
    "ensure_packages",
    "foreign_pcscd_pids",
    "reader_name",
]

# --------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------

#: Debian packages the rig needs.  swig + libpcsclite-dev are only needed when
#: pip has to build pyscard from source; opensc / pcsc-tools are debugging aids
#: (opensc-tool, pcsc_scan).
def _read_package_list(path=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "debian-packages.txt")):
    with open(path, encoding="utf-8") as f:
        return tuple(line.split("#", 1)[0].strip() for line in f
                     if line.split("#", 1)[0].strip())


#: One list for the whole suite: tests/debian-packages.txt.
DEBIAN_PACKAGES = _read_package_list()

PIP_PACKAGES = {"smartcard": "pyscard", "Crypto": "pycryptodome"}

VICC = "/usr/bin/vicc"
VICC_PYTHONPATH = "/usr/lib/python3/site-packages/virtualsmartcard"
PCSCD_RUN_DIR = "/run/pcscd"
PCSCD_SOCKET = os.path.join(PCSCD_RUN_DIR, "pcscd.comm")
PCSCD_PIDFILE = os.path.join(PCSCD_RUN_DIR, "pcscd.pid")
VPCD_CONF = "/etc/reader.conf.d/vpcd"
#: vpcd's default port for slot 0 (CHANNELID 0x8C7B in /etc/reader.conf.d/vpcd).
VPCD_BASE_PORT = 0x8C7B  # 35963
#: Slots exposed by Debian's vpcd build (one reader, 2 slots).
VPCD_SLOTS = 2
VPCD_FRIENDLY_NAME = "Virtual PCD"

#: Debian's vpcd 3.3 writes the 2-byte length and the APDU with two send()
#: calls and no TCP_NODELAY, so Nagle holds the APDU until vicc ACKs the
#: length, which Linux delays by ~40 ms: every APDU (and every 400 ms
#: presence poll) then takes ~44 ms.  This launcher runs /usr/bin/vicc with
#: TCP_QUICKACK set before every recv(), which brings an APDU down to ~0.3 ms.
#: Used when PcscRig(quickack=True) (the default): written to
#: LOG_DIR/vicc_quickack.py and run as ``python vicc_quickack.py /usr/bin/vicc
#: ARGS``.
VICC_QUICKACK_LAUNCHER = """\
import runpy, socket, sys
_recv = socket.socket.recv
def recv(self, *args, **kwargs):
    try:
        self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except OSError:
        pass
    return _recv(self, *args, **kwargs)
socket.socket.recv = recv
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

DEFAULT_PCSCD_TIMEOUT = 10.0
DEFAULT_CARD_TIMEOUT = 10.0
DEFAULT_STOP_TIMEOUT = 5.0


class RigError(RuntimeError):
    """The rig could not be set up or a bounded wait ran out."""


def reader_name(slot: int, friendly_name: str = VPCD_FRIENDLY_NAME) -> str:
    """pcscd's name for vpcd slot ``slot`` (``Virtual PCD 00 00`` for 0)."""
    return "%s 00 %02X" % (friendly_name, slot)


# --------------------------------------------------------------------------
# packages
# --------------------------------------------------------------------------

def _dpkg_installed(package: str) -> bool:
    try:
        r = subprocess.run(["dpkg", "-s", package], capture_output=True,
                           text=True, timeout=60)
    except FileNotFoundError:
        raise RigError("dpkg not found: the PC/SC rig needs a Debian system")
    if r.returncode != 0:
        return False
    for line in r.stdout.splitlines():
        if line.startswith("Status:"):
            return line.split()[-1] == "installed"
    return False


def missing_debian_packages(packages=DEBIAN_PACKAGES) -> list:
    return [p for p in packages if not _dpkg_installed(p)]


def missing_python_modules() -> list:
    importlib.invalidate_caches()
    return [dist for mod, dist in PIP_PACKAGES.items()
            if importlib.util.find_spec(mod) is None]


def ensure_packages(packages=DEBIAN_PACKAGES, quiet: bool = True) -> None:
    """Install what the rig needs, or raise :class:`RigError` saying what.

    Debian packages are installed with apt-get when running as root.  pyscard
    and pycryptodome must import (tests/run.sh installs them; a
    :class:`RigError` names the command otherwise).
    """
    out = subprocess.DEVNULL if quiet else None
    missing = missing_debian_packages(packages)
    if missing:
        if os.geteuid() != 0:
            raise RigError(
                "PC/SC rig: missing Debian packages %s; install them as root: "
                "apt-get update && apt-get install -y --no-install-recommends %s"
                % (", ".join(missing), " ".join(missing)))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends",
                     *missing]):
            r = subprocess.run(cmd, env=env, stdout=out, stderr=out,
                               stdin=subprocess.DEVNULL, timeout=1200)
            if r.returncode != 0:
                raise RigError("PC/SC rig: %r failed (exit %d)"
                               % (" ".join(cmd), r.returncode))
        still = missing_debian_packages(missing)
        if still:
            raise RigError("PC/SC rig: still missing after apt-get: %s"
                           % ", ".join(still))

    dists = missing_python_modules()
    if dists:
        # never pip here: the test run is offline (tests/run.sh's install
        # phase installs the [pcsc,test] extras)
        raise RigError(
            "PC/SC rig: %s not importable in %s; install them before the tests "
            "(tests/run.sh does): %s -m pip install %s"
            % (", ".join(dists), sys.executable, sys.executable, " ".join(dists)))


# --------------------------------------------------------------------------
# process helpers
# --------------------------------------------------------------------------

def _proc_comm(pid: int) -> str | None:
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_cmdline(pid: int) -> str:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _proc_state(pid: int) -> str | None:
    """Single-letter state from /proc/PID/stat (R, S, T, Z, ...)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pcscd_pids() -> list:
    """PIDs of all live (non-zombie) pcscd processes on the machine."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _proc_comm(int(name)) == "pcscd":
            if _proc_state(int(name)) not in (None, "Z", "X"):
                pids.append(int(name))
    return sorted(pids)


def foreign_pcscd_pids(own=()) -> list:
    """pcscd processes running that are not in ``own``."""
    return [p for p in pcscd_pids() if p not in set(own)]


def _port_in_use(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port.

    Only call this while no pcscd is running: vpcd would take the probe
    connection for a virtual card."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _port_held(port: int) -> bool:
    """True if any TCP socket on this machine (any state, TIME_WAIT
    included) has ``port`` as its local port: vpcd could not bind it."""
    want = ":%04X" % port
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 1 and fields[1].endswith(want):
                        return True
        except OSError:
            pass
    return False


def reserve_vpcd_ports(base_port=None, count=None):
    """Keep the kernel from handing vpcd's ports to outgoing connections
    (they lie in the ephemeral range; a load test's client socket on
    35964 in TIME_WAIT would stop pcscd from listening for a minute).
    Root only, runtime only; adds to what is reserved already."""
    base_port = _read_vpcd_base_port() if base_port is None else base_port
    count = VPCD_SLOTS if count is None else count
    path = "/proc/sys/net/ipv4/ip_local_reserved_ports"
    want = "%d-%d" % (base_port, base_port + count - 1)
    try:
        with open(path) as f:
            current = f.read().strip()
        if want in current.split(","):
            return
        with open(path, "w") as f:
            f.write(",".join(x for x in (current, want) if x))
    except OSError:
        pass  # not root, or no such knob: the rig's retries remain


#: Longest a socket may hold a vpcd port after closing (TIME_WAIT is 60 s).
PORT_WAIT = 75.0


def _vpcd_bind_failed(log_path: str) -> bool:
    """Whether pcscd's log says vpcd could not open a slot's TCP port."""
    try:
        with open(log_path, errors="replace") as f:
            return "Could not initialize connection to virtual ICC" in f.read()
    except OSError:
        return False


def _read_vpcd_base_port(path: str = VPCD_CONF) -> int:
    """CHANNELID from vpcd's reader.conf (the port of slot 0)."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "CHANNELID":
                    return int(parts[1], 0)
    except (OSError, ValueError):
        pass
    return VPCD_BASE_PORT


_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):  # pragma: no cover
    _prctl = None


def _child_setup_pdeathsig():  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------
# pyscard helpers (imported lazily so ensure_packages() can install pyscard)
# --------------------------------------------------------------------------

def _scard():
    from smartcard import scard
    return scard


def list_readers() -> list:
    """Readers pcscd knows now ([] if none); RigError if pcscd is down."""
    scard = _scard()
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hr != scard.SCARD_S_SUCCESS:
        raise RigError("SCardEstablishContext: %s (0x%08X)"
                       % (scard.SCardGetErrorMessage(hr), hr & 0xFFFFFFFF))
    try:
        hr, readers = scard.SCardListReaders(ctx, [])
        if hr == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        if hr != scard.SCARD_S_SUCCESS:
            raise RigError("SCardListReaders: %s (0x%08X)"
                           % (scard.SCardGetErrorMessage(hr), hr & 0xFFFFFFFF))
        return list(readers)
    finally:
        scard.SCardReleaseContext(ctx)


def card_state(reader: str):
    """(present, atr_bytes) for ``reader`` right now."""
    scard = _scard()
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hr != scard.SCARD_S_SUCCESS:
        raise RigError("SCardEstablishContext: %s"
                       % scard.SCardGetErrorMessage(hr))
    try:
        hr, states = scard.SCardGetStatusChange(
            ctx, 0, [(reader, scard.SCARD_STATE_UNAWARE)])
        if hr != scard.SCARD_S_SUCCESS:
            raise RigError("SCardGetStatusChange(%r): %s (0x%08X)"
                           % (reader, scard.SCardGetErrorMessage(hr),
                              hr & 0xFFFFFFFF))
        _, event, atr = states[0]
        return bool(event & scard.SCARD_STATE_PRESENT), bytes(atr)
    finally:
        scard.SCardReleaseContext(ctx)


# --------------------------------------------------------------------------
# the rig
# --------------------------------------------------------------------------

class PcscRig:
    """pcscd + vpcd + vicc cards, all started (and stopped) by this object.

    Typical use::

        rig = PcscRig()
        rig.start()                 # pcscd
        rig.start_card(0)           # card in "Virtual PCD 00 00"
        ...
        rig.stop()                  # everything, by PID

    Also a context manager (``with PcscRig() as rig:`` starts pcscd).
    """

    def __init__(self, log_dir: str | None = None, *, pcscd_debug: bool = True,
                 pcscd_apdu_log: bool = False, vicc_verbosity: int = 3,
                 quickack: bool = True, python: str | None = None,
                 pcscd_args=()):
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="pcsc-rig-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.pcscd_debug = pcscd_debug
        self.pcscd_apdu_log = pcscd_apdu_log
        self.vicc_verbosity = vicc_verbosity
        self.quickack = quickack
        self.python = python or sys.executable
        self.pcscd_args = list(pcscd_args)
        self.base_port = _read_vpcd_base_port()
        self.pcscd = None           # subprocess.Popen
        self.cards = {}             # slot -> subprocess.Popen
        self.card_types = {}        # slot -> card type
        self.frozen = set()
        self.timings = {}           # name -> seconds (last measured)
        self._counter = 0
        self._lock = threading.RLock()
        self._atexit = False

    # -- names / info ------------------------------------------------------

    slots = tuple(range(VPCD_SLOTS))

    @staticmethod
    def reader_name(slot: int) -> str:
        return reader_name(slot)

    @property
    def reader_names(self) -> list:
        return [reader_name(s) for s in self.slots]

    def port(self, slot: int) -> int:
        return self.base_port + slot

    def readers(self) -> list:
        """Reader names as pcscd lists them now."""
        return list_readers()

    def card_present(self, slot: int) -> bool:
        return card_state(reader_name(slot))[0]

    def atr(self, slot: int) -> bytes:
        return card_state(reader_name(slot))[1]

    @property
    def pcscd_pid(self):
        return self.pcscd.pid if self.pcscd else None

    def card_pid(self, slot: int):
        p = self.cards.get(slot)
        return p.pid if p else None

    def pids(self) -> dict:
        d = {"pcscd": self.pcscd_pid}
        for slot, p in sorted(self.cards.items()):
            d["vicc%d" % slot] = p.pid
        return d

    @property
    def pcscd_log(self):
        """Log file of the current (last started) pcscd."""
        return self.pcscd.log_path if self.pcscd else None

    def card_log(self, slot: int):
        """Log file of the slot's current vicc."""
        p = self.cards.get(slot)
        return p.log_path if p else None

    # -- child processes ---------------------------------------------------

    def _spawn(self, cmd, log_name, env=None):
        self._counter += 1
        path = os.path.join(self.log_dir, "%s.%d.log" % (log_name,
                                                          self._counter))
        log = open(path, "ab", buffering=0)
        log.write(("# %s\n" % shlex.join(cmd)).encode())
        kwargs = {}
        # PDEATHSIG fires when the *thread* that forked exits, so only use it
        # from the main thread (the children then die with the test process).
        if threading.current_thread() is threading.main_thread():
            kwargs["preexec_fn"] = _child_setup_pdeathsig
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, close_fds=True,
                                    **kwargs)
        finally:
            log.close()
        proc.log_path = path
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        return proc

    @staticmethod
    def _terminate(proc, timeout=DEFAULT_STOP_TIMEOUT) -> int:
        """SIGTERM (+SIGCONT in case it is stopped), wait, SIGKILL."""
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        return proc.returncode

    # -- pcscd -------------------------------------------------------------

    def _pcscd_cmd(self):
        exe = shutil.which("pcscd", path=os.environ.get("PATH", "")
                           + ":/usr/sbin:/sbin") or "/usr/sbin/pcscd"
        cmd = [exe, "--foreground"]
        if self.pcscd_debug:
            cmd.append("--debug")
        if self.pcscd_apdu_log:
            cmd.append("--apdu")
        return cmd + self.pcscd_args

    def _reserve_vpcd_ports(self):
        reserve_vpcd_ports(self.base_port, len(self.slots))

    def _preflight(self):
        self._reserve_vpcd_ports()
        foreign = foreign_pcscd_pids(own=[self.pcscd_pid] if self.pcscd else [])
        if foreign:
            desc = "; ".join("pid %d: %s" % (p, _proc_cmdline(p))
                             for p in foreign)
            raise RigError(
                "a pcscd not started by this rig is running (%s). The rig "
                "needs its own pcscd on %s; stop that one first (kill PID)."
                % (desc, PCSCD_SOCKET))
        busy = [self.port(s) for s in self.slots if _port_in_use(self.port(s))]
        if busy:
            raise RigError("vpcd port(s) %s already in use by another process"
                           % busy)
        # A client socket that got a vpcd port before it was reserved (in
        # TIME_WAIT for up to a minute) would stop vpcd from listening.
        deadline = time.monotonic() + PORT_WAIT
        while (any(_port_held(self.port(s)) for s in self.slots)
               and time.monotonic() < deadline):
            time.sleep(0.5)
        # No pcscd runs, so these are leftovers of a killed one.  pcscd 1.9.9
        # copes with most, but refuses to start ("Another pcscd seems to be
        # running") if a stale pcscd.pid names a live process (PID reuse).
        for path in (PCSCD_SOCKET, PCSCD_PIDFILE):
            if os.path.lexists(path):
                os.unlink(path)

    def start(self, timeout: float = DEFAULT_PCSCD_TIMEOUT) -> float:
        """Start pcscd; wait (bounded) until it lists both vpcd readers.

        Returns the seconds it took."""
        with self._lock:
            if self.pcscd and self.pcscd.poll() is None:
                return 0.0
            self._take_machine_lock()
            self._preflight()
            t0 = time.monotonic()
            self.pcscd = self._spawn(self._pcscd_cmd(), "pcscd")
            deadline = t0 + timeout
            last = None
            started = t0
            retries = 3
            while True:
                if self.pcscd.poll() is not None:
                    raise RigError("pcscd exited with %s during start; log %s:\n%s"
                                   % (self.pcscd.returncode, self.pcscd.log_path,
                                      _tail(self.pcscd.log_path)))
                if os.path.exists(PCSCD_SOCKET):
                    try:
                        have = list_readers()
                        if all(r in have for r in self.reader_names):
                            break
                        last = "readers so far: %r" % have
                    except RigError as e:
                        last = str(e)
                if time.monotonic() > deadline:
                    self._terminate(self.pcscd)
                    raise RigError("pcscd not ready after %.1fs (%s); log %s:\n%s"
                                   % (timeout, last, self.pcscd.log_path,
                                      _tail(self.pcscd.log_path)))
                if (time.monotonic() - started > 1.0 and retries > 0
                        and _vpcd_bind_failed(self.pcscd.log_path)):
                    # vpcd could not listen on a slot's port: another
                    # process's ephemeral (client) port or a TIME_WAIT held
                    # it.  pcscd never retries, so start it again.
                    retries -= 1
                    self._terminate(self.pcscd)
                    time.sleep(0.5)
                    self._preflight()
                    self.pcscd = self._spawn(self._pcscd_cmd(), "pcscd")
                    started = time.monotonic()
                    continue
                time.sleep(0.02)
            took = time.monotonic() - t0
            self.timings["pcscd_start"] = took
            return took

    def stop_pcscd(self, timeout: float = DEFAULT_STOP_TIMEOUT, kill: bool = False):
        """Stop pcscd (SIGTERM, or SIGKILL if ``kill``).

        vicc exits by itself (status 0) when pcscd closes its connection; the
        cards are reaped, and any still running after 1 s (a frozen one
        cannot exit) are terminated, so no card survives its pcscd."""
        with self._lock:
            if self.pcscd is not None:
                if kill and self.pcscd.poll() is None:
                    self.pcscd.kill()
                    self.pcscd.wait(timeout)
                self._terminate(self.pcscd, timeout)
            for slot in self.frozen & set(self.cards):
                self._terminate(self.cards[slot], timeout)
            self._reap_cards(1.0)
            for slot in list(self.cards):
                self._terminate(self.cards[slot], timeout)
            self._reap_cards(0)

    def restart_pcscd(self, restart_cards: bool = True,
                      timeout: float = DEFAULT_PCSCD_TIMEOUT) -> float:
        """Stop and start pcscd.  vicc dies with pcscd (its connection is
        closed), so the cards that were running are started again unless
        ``restart_cards`` is false.  Returns the seconds pcscd took to start."""
        with self._lock:
            types = dict(self.card_types) if restart_cards else {}
            self.stop_pcscd()
            for slot in list(self.cards):
                self.stop_card(slot, wait_absent=False)
            took = self.start(timeout)
            for slot, typ in sorted(types.items()):
                self.start_card(slot, typ)
            return took

    # -- cards -------------------------------------------------------------

    def _vicc_cmd(self, slot, card_type, extra_args):
        cmd = [self.python]
        if self.quickack:
            launcher = os.path.join(self.log_dir, "vicc_quickack.py")
            if not os.path.exists(launcher):
                with open(launcher, "w") as f:
                    f.write(VICC_QUICKACK_LAUNCHER)
            cmd.append(launcher)
        cmd += [VICC, "-t", card_type, "-H", "127.0.0.1",
                "-P", str(self.port(slot))]
        if self.vicc_verbosity:
            cmd.append("-" + "v" * self.vicc_verbosity)
        return cmd + list(extra_args)

    def _vicc_env(self):
        env = dict(os.environ)
        pp = env.get("PYTHONPATH")
        env["PYTHONPATH"] = VICC_PYTHONPATH + (os.pathsep + pp if pp else "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start_card(self, slot: int, type: str = "iso7816",
                   timeout: float = DEFAULT_CARD_TIMEOUT, extra_args=()) -> float:
        """Start a vicc of ``type`` on ``slot``; wait (bounded) until pcscd
        reports a card present in ``Virtual PCD 00 0<slot>``.

        Returns the seconds it took."""
        if slot not in self.slots:
            raise ValueError("vpcd has slots %r, not %r" % (self.slots, slot))
        with self._lock:
            if self.pcscd is None or self.pcscd.poll() is not None:
                raise RigError("start pcscd first (rig.start())")
            self._reap_cards(0)
            if slot in self.cards:
                raise RigError("slot %d already has a card (pid %d)"
                               % (slot, self.cards[slot].pid))
            # A card that just exited may still be "present" until pcscd's
            # next poll (<= 0.4 s); waiting for "present" now would return
            # at once, before the new card is there.  Wait for the old one
            # to be gone first.
            try:
                if self.card_present(slot):
                    self.wait_card(slot, False, 2.0)
            except RigError:
                pass
            t0 = time.monotonic()
            proc = self._spawn(self._vicc_cmd(slot, type, extra_args),
                               "vicc-slot%d" % slot, env=self._vicc_env())
            self.cards[slot] = proc
            self.card_types[slot] = type
            self.frozen.discard(slot)
            try:
                self.wait_card(slot, True, timeout, t0=t0, proc=proc)
            except RigError:
                self.stop_card(slot, wait_absent=False)
                raise
            took = time.monotonic() - t0
            self.timings["card_start"] = took
            return took

    def wait_card(self, slot: int, present: bool = True,
                  timeout: float = DEFAULT_CARD_TIMEOUT, *, t0=None,
                  proc=None) -> float:
        """Wait (bounded) until the slot's card is present / absent as pcscd
        reports it.  Returns seconds waited; RigError on timeout.

        Uses blocking SCardGetStatusChange (in slices of at most 250 ms, so
        a dying ``proc`` is noticed), not busy polling."""
        scard = _scard()
        t0 = time.monotonic() if t0 is None else t0
        deadline = t0 + timeout
        name = reader_name(slot)
        ctx = None
        current = scard.SCARD_STATE_UNAWARE
        last = None
        try:
            while True:
                hr = None
                if ctx is None:
                    hr, c = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
                    if hr == scard.SCARD_S_SUCCESS:
                        ctx, current = c, scard.SCARD_STATE_UNAWARE
                    else:
                        last = scard.SCardGetErrorMessage(hr)
                if ctx is not None:
                    left = max(0.0, deadline - time.monotonic())
                    wait_ms = (0 if current == scard.SCARD_STATE_UNAWARE
                               else int(min(0.25, left) * 1000))
                    hr, states = scard.SCardGetStatusChange(
                        ctx, wait_ms, [(name, current)])
                    if hr == scard.SCARD_S_SUCCESS:
                        _, event, _atr = states[0]
                        if event & scard.SCARD_STATE_UNKNOWN:
                            last = "no reader %r" % name
                        elif bool(event & scard.SCARD_STATE_PRESENT) == present:
                            return time.monotonic() - t0
                        else:
                            last = "present=%s" % (not present)
                        current = event & ~scard.SCARD_STATE_CHANGED
                    elif hr != scard.SCARD_E_TIMEOUT:
                        # pcscd gone or restarted: a context does not survive
                        last = scard.SCardGetErrorMessage(hr)
                        scard.SCardReleaseContext(ctx)
                        ctx = None
                if proc is not None and proc.poll() is not None:
                    raise RigError("vicc for slot %d exited with %s; log %s:\n%s"
                                   % (slot, proc.returncode, proc.log_path,
                                      _tail(proc.log_path)))
                if time.monotonic() > deadline:
                    raise RigError("card in %r not %s after %.1fs (%s)"
                                   % (name, "present" if present else "absent",
                                      timeout, last))
                if hr not in (scard.SCARD_S_SUCCESS, scard.SCARD_E_TIMEOUT):
                    time.sleep(0.02)
        finally:
            if ctx is not None:
                scard.SCardReleaseContext(ctx)

    def stop_card(self, slot: int, wait_absent: bool = True,
                  timeout: float = DEFAULT_STOP_TIMEOUT) -> float:
        """Stop the slot's vicc (SIGTERM/SIGCONT, SIGKILL after ``timeout``)
        and, if ``wait_absent`` and pcscd runs, wait until the card is gone.
        Returns the seconds until absent (0.0 if not waited)."""
        with self._lock:
            proc = self.cards.pop(slot, None)
            self.card_types.pop(slot, None)
            self.frozen.discard(slot)
            if proc is None:
                return 0.0
            t0 = time.monotonic()
            self._terminate(proc, timeout)
            if wait_absent and self.pcscd and self.pcscd.poll() is None:
                took = self.wait_card(slot, False, timeout, t0=t0)
                self.timings["card_removal"] = took
                return took
            return 0.0

    def kill_card(self, slot: int) -> None:
        """SIGKILL the slot's vicc (no waiting for pcscd to notice)."""
        with self._lock:
            proc = self.cards.pop(slot, None)
            self.card_types.pop(slot, None)
            self.frozen.discard(slot)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(DEFAULT_STOP_TIMEOUT)

    def freeze_card(self, slot: int) -> None:
        """SIGSTOP the slot's vicc: the card stays 'inserted' but never
        answers (vpcd then blocks in recv, see the report in the docs)."""
        with self._lock:
            self.cards[slot].send_signal(signal.SIGSTOP)
            self.frozen.add(slot)

    def thaw_card(self, slot: int) -> None:
        """SIGCONT the slot's vicc."""
        with self._lock:
            self.cards[slot].send_signal(signal.SIGCONT)
            self.frozen.discard(slot)

    def _reap_cards(self, timeout):
        """Forget vicc processes that have exited (or exit within timeout)."""
        deadline = time.monotonic() + timeout
        for slot, proc in list(self.cards.items()):
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue
            self.cards.pop(slot, None)
            self.card_types.pop(slot, None)
            self.frozen.discard(slot)

    # -- whole rig ---------------------------------------------------------

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop every process this rig started (by PID), cards first."""
        with self._lock:
            for slot in list(self.cards):
                proc = self.cards.pop(slot)
                self._terminate(proc, timeout)
            self.card_types.clear()
            self.frozen.clear()
            if self.pcscd is not None:
                self._terminate(self.pcscd, timeout)
            self._drop_machine_lock()

    # One pcscd (one socket, fixed vpcd ports) per machine: rigs in
    # concurrent test runs take turns instead of failing.
    MACHINE_LOCK = "/tmp/cloudfoxy-pcsc-rig.lock"
    MACHINE_LOCK_WAIT = 900.0

    def _take_machine_lock(self):
        if getattr(self, "_lock_fd", None) is not None:
            return
        import fcntl
        fd = os.open(self.MACHINE_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.MACHINE_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RigError("another PC/SC rig held %s for %.0fs"
                                   % (self.MACHINE_LOCK, self.MACHINE_LOCK_WAIT))
                time.sleep(0.2)
        self._lock_fd = fd

    def _drop_machine_lock(self):
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

SELECT_MF = "00A4000C023F00"
GET_CHALLENGE = "0084000008"


def _transmit_hex(conn, apdu_hex):
    data, sw1, sw2 = conn.transmit(list(bytes.fromhex(apdu_hex)))
    return bytes(data), (sw1 << 8) | sw2


def _cmd_up(args) -> int:
    rig = PcscRig(args.log_dir)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        took = rig.start()
        print("pcscd pid %d ready in %.2fs" % (rig.pcscd_pid, took), flush=True)
        for slot in range(args.cards):
            took = rig.start_card(slot, args.type)
            print("vicc pid %d: card in %r after %.2fs (port %d)"
                  % (rig.card_pid(slot), reader_name(slot), took,
                     rig.port(slot)), flush=True)
        print("logs in %s; Ctrl-C or SIGTERM to stop" % rig.log_dir, flush=True)
        while not stop.wait(0.5):
            if rig.pcscd.poll() is not None:
                print("pcscd exited (%s)" % rig.pcscd.returncode, flush=True)
                return 1
        return 0
    except RigError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    finally:
        rig.stop()
        print("stopped", flush=True)


def _cmd_check(args) -> int:
    from smartcard.util import toHexString

    ok = True
    rig = PcscRig(args.log_dir)
    try:
        print("pcscd ready in %.2fs (pid %d)" % (rig.start(), rig.pcscd_pid))
        for slot in (0, 1):
            print("card %d present after %.2fs (pid %d)"
                  % (slot, rig.start_card(slot, args.type), rig.card_pid(slot)))
        have = rig.readers()
        print("readers: %r" % have)
        for name in rig.reader_names:
            if name not in have:
                print("FAIL: reader %r missing" % name)
                ok = False
        from smartcard.System import readers
        reader = [r for r in readers() if str(r) == reader_name(0)][0]
        conn = reader.createConnection()
        conn.connect()
        try:
            print("ATR: %s" % toHexString(conn.getATR()))
            for apdu in (SELECT_MF, GET_CHALLENGE, GET_CHALLENGE):
                data, sw = _transmit_hex(conn, apdu)
                print("%s -> %s %04X" % (apdu, data.hex().upper() or "-", sw))
                if sw != 0x9000 or (apdu == GET_CHALLENGE and len(data) != 8):
                    print("FAIL: unexpected response to %s" % apdu)
                    ok = False
        finally:
            conn.disconnect()
            conn.release()  # else __del__ complains once pcscd is gone
    except Exception as e:  # report anything as a failed check
        print("FAIL: %s: %s" % (type(e).__name__, e))
        ok = False
    finally:
        rig.stop()
    if ok and not args.log_dir:
        shutil.rmtree(rig.log_dir, ignore_errors=True)
    else:
        print("logs in %s" % rig.log_dir)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-install", action="store_true",
                   help="do not install missing packages")
    p.add_argument("--log-dir", help="where child logs go (default: a temp dir)")
    p.add_argument("--type", default="iso7816", help="vicc card type")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="run pcscd + cards until Ctrl-C/SIGTERM")
    up.add_argument("--cards", type=int, default=2, choices=(0, 1, 2))
    sub.add_parser("check", help="start, smoke-test with pyscard, stop")
    args = p.parse_args(argv)
    try:
        if args.no_install:
            missing = missing_debian_packages() + missing_python_modules()
            if missing:
                raise RigError("missing: %s" % ", ".join(missing))
        else:
            ensure_packages()
    except RigError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    return _cmd_up(args) if args.cmd == "up" else _cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
