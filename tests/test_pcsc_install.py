"""The README's PC/SC install, ``pip install '.[pcsc]'``, in a new
virtualenv of a copy of the tree, offline from the install phase's
provisioning (tests/provision.py: pyscard's source distribution and its
build requirements' wheels, in ``CLOUDFOXY_TEST_WHEELS``).

As root, each Debian build dependency of pyscard that pip cannot fetch (the
C compiler, Python's headers, pcsc-lite's headers) is hidden in turn in a
throwaway mount namespace (``unshare --mount``, an empty file or directory
bind-mounted over it), as on a machine without the package: the install
fails with pip's build error, the path's package is one tests/debian-packages.txt
lists, and the proxy installed without the extra says, when ``pcsc:`` is
asked for, the command that works from a clone.  With everything present
the same virtualenv builds pyscard and ``twistd foxyproxy --backend pcsc:``
serves the PC/SC rig's readers.
"""

import base64
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest

from support import HOST, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provision import COPY_IGNORE  # noqa: E402
from pcsc_rig import DEBIAN_PACKAGES  # noqa: E402

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="unshare --mount and bind mounts need root")]


def build_paths():
    """[(what, path, Debian package, what pip's build error says without
    it)] of pyscard's build dependencies that pip cannot fetch, as this
    interpreter builds extensions (swig comes from PyPI: pyscard's
    pyproject.toml requires it)."""
    cc = sysconfig.get_config_var("CC").split()[0]
    return [
        ("C compiler", shutil.which(cc) or shutil.which("gcc"), "gcc", f"Permission denied: '{cc}'"),
        ("Python headers", sysconfig.get_paths()["include"], "python3-dev", "Python.h: No such file"),
        ("pcsc-lite headers", "/usr/include/PCSC", "libpcsclite-dev", "winscard.h: No such file"),
    ]


def owner(path):
    """The Debian package that installed ``path`` (dpkg -S), or None."""
    out = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True, timeout=30)
    return out.stdout.split(":", 1)[0].strip() if out.returncode == 0 else None


def depends(package):
    """``package`` and every package it depends on, installed (apt-cache)."""
    out = subprocess.run(["apt-cache", "depends", "--recurse", "--installed", "--no-recommends", "--no-suggests",
                          "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", package],
                         capture_output=True, text=True, timeout=60)
    return {line.split(":", 1)[-1].strip().split(":")[0] for line in out.stdout.splitlines()} | {package}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    folder = os.environ.get("CLOUDFOXY_TEST_WHEELS")
    if not folder:  # run ad hoc, not by tests/run.sh: provision here (needs the network)
        folder = str(tmp_path_factory.mktemp("wheels"))
        subprocess.run([sys.executable, os.path.join(ROOT, "tests", "provision.py"), folder], check=True,
                       timeout=900)
    assert any(n.startswith("pyscard-") and n.endswith(".tar.gz") for n in os.listdir(folder)), folder
    return folder


def pip_install(venv, wheels, target, cwd, hide=None, hidden_dir=None):
    """``VENV/bin/pip install TARGET`` offline, with ``hide`` covered by an
    empty file or directory in a mount namespace of its own."""
    pip = [os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", "--no-cache-dir",
           "--no-index", "--find-links", wheels, target]
    if hide:
        cover = hidden_dir if os.path.isdir(hide) else "/dev/null"
        pip = ["unshare", "--mount", "--propagation", "private", "--", "bash", "-c",
               'mount --bind "$1" "$2" && shift 2 && exec "$@"', "bash", cover, hide] + pip
    return subprocess.run(pip, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)  # three failing builds, one real one, then the shared PC/SC rig's lock
def test_pcsc_install_fresh_venv(tmp_path, wheels, request):
    copy = tmp_path / "cloudfoxy-proxy"
    shutil.copytree(ROOT, copy, ignore=COPY_IGNORE)
    venv = str(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    empty = tmp_path / "empty"
    empty.mkdir()
    listed = set(DEBIAN_PACKAGES)

    # without each build dependency: pip's build error, and the package is listed
    for what, path, package, error in build_paths():
        assert path and os.path.exists(path), (what, path)
        assert package in listed, (what, package)
        if owner(path) is not None or path.startswith("/usr/"):  # not a pyenv/self-built Python's headers
            assert owner(path) in depends(package), (what, path, owner(path), package)
        done = pip_install(venv, wheels, ".[pcsc]", cwd=str(copy), hide=path, hidden_dir=str(empty))
        assert done.returncode != 0, (what, path, done.stdout)
        assert "Failed building wheel for pyscard" in done.stderr or "pyscard" in done.stderr, done.stderr[-2000:]
        assert error in done.stderr, (what, error, done.stderr[-2000:])
        assert not os.path.exists(os.path.join(venv, "bin", "twistd")), what  # nothing half installed

    # the proxy without the extra names the command that works from a clone
    done = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
                           "--no-cache-dir", "--no-index", "--find-links", wheels, "."],
                          cwd=str(copy), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    twistd = os.path.join(venv, "bin", "twistd")
    done = subprocess.run([twistd, "-n", "--pidfile=", "foxyproxy", "--backend", "pcsc:", "-p", "tcp:0"],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "pyscard is not installed" in lines[0] and "pip install '.[pcsc]'" in lines[0], lines
    for package in ("gcc", "python3-dev", "libpcsclite-dev"):
        assert package in lines[0] and package in listed, (package, lines)

    # with them: pyscard builds from its source, and pcsc: serves the rig's readers
    started = time.monotonic()
    done = pip_install(venv, wheels, ".[pcsc]", cwd=str(copy))
    built = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    check = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "from smartcard import scard"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    request.getfixturevalue("pcsc_rig")  # last: it may wait for the machine's one pcscd
    log = open(tmp_path / "proxy.log", "wb")
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "foxyproxy", "--backend", "pcsc:",
                             "-p", f"tcp:0:interface={HOST}"], cwd=str(tmp_path), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        def port():
            assert proc.poll() is None, (tmp_path / "proxy.log").read_text()
            m = re.search(r"LineFactory starting on (\d+)", (tmp_path / "proxy.log").read_text(errors="replace"))
            return m and int(m.group(1))
        number = wait_for(port, timeout=60, what="the pcsc: proxy's listener")
        out = subprocess.run(["bash", "-c", f"printf '>*|\\n>1:READERS|\\n\\n' | nc -N {HOST} {number}"],
                             capture_output=True, text=True, timeout=30)
        names = [base64.b64decode(n).decode() for n in out.stdout.splitlines()[0][3:].split("|")]
        assert any(n.startswith("Virtual PCD") for n in names), (out.stdout, names)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
    print(f"pyscard built and installed in a new virtualenv in {built:.1f} s")
