"""The install phase's provisioning for the tests (tests/run.sh runs it;
it needs the network, the pytest phase never does):

* the original FoxyProxy 2.10 in its own virtualenv (``support.FOXYPROXY_VENV``,
  ``.venv-foxyproxy``), for the differential tests; kept when it already
  imports;
* the project's wheel, built from a copy of the tree (the checkout is not
  written), and the wheels of its dependencies and build backend, into the
  directory given as the argument (``CLOUDFOXY_TEST_WHEELS``), for
  tests/test_packaging.py and the README's install command
  (tests/test_readme.py);
* pyscard's source distribution (the ``pcsc`` extra; no Linux wheel is
  assumed) and the wheels of its build requirements (setuptools, swig), into
  the same directory: tests/test_pcsc_install.py builds it in a new
  virtualenv with ``pip install '.[pcsc]'`` offline.

Usage: ``.venv/bin/python tests/provision.py WHEEL_DIR``.  Prints what it
installs; exit status non-zero with one line on stderr on failure.
"""

import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import FOXYPROXY_PACKAGES, FOXYPROXY_VENV, ROOT, foxyproxy_check  # noqa: E402

COPY_IGNORE = shutil.ignore_patterns(".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".tox", "_trial_temp*", ".tests-install.lock")


def run(step, what):
    done = subprocess.run(step, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"tests/provision.py: {what} failed ({' '.join(step[:4])} ...): "
                 + " ".join(done.stderr.strip().splitlines()[-3:]))


def foxyproxy():
    if foxyproxy_check() is None:
        print(f"  FoxyProxy 2.10: already in {FOXYPROXY_VENV}")
        return
    print(f"  FoxyProxy 2.10: installing {' '.join(FOXYPROXY_PACKAGES)} into {FOXYPROXY_VENV}")
    base = getattr(sys, "_base_executable", sys.executable)
    python = os.path.join(FOXYPROXY_VENV, "bin", "python")
    run([base, "-m", "venv", "--clear", FOXYPROXY_VENV], "creating the FoxyProxy virtualenv")
    run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check"] + FOXYPROXY_PACKAGES,
        "installing FoxyProxy 2.10")
    problem = foxyproxy_check()
    if problem:
        sys.exit(f"tests/provision.py: FoxyProxy 2.10 does not import after the install: {problem}")


def wheel(out):
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cloudfoxy-wheel-") as tmp:
        copy = os.path.join(tmp, "cloudfoxy-proxy")
        shutil.copytree(ROOT, copy, ignore=COPY_IGNORE)
        # the project's wheel and every wheel its install needs (its
        # dependencies, the build backend): the README's first command then
        # installs offline (tests/test_readme.py, PIP_FIND_LINKS)
        run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", out, copy,
             "setuptools>=64", "wheel"], "building the wheels")
    print(f"  wheels: {len(os.listdir(out))} in {out} (the project's and its dependencies')")


def pyscard_source(out):
    import configparser

    extras = configparser.ConfigParser()
    extras.read(os.path.join(ROOT, "setup.cfg"))
    pcsc = extras["options.extras_require"]["pcsc"].split()
    # --no-binary: what a fresh machine builds (pyscard's pyproject.toml
    # build requirements are setuptools and swig, from wheels)
    run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-binary", "pyscard", "-d", out, " ".join(pcsc), "setuptools", "swig", "wheel"],
        "downloading pyscard's source and build requirements")
    print(f"  pyscard: {', '.join(n for n in sorted(os.listdir(out)) if n.lower().startswith(('pyscard', 'swig')))}"
          f" in {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tests/provision.py WHEEL_DIR")
    foxyproxy()
    wheel(sys.argv[1])
    pyscard_source(sys.argv[1])
