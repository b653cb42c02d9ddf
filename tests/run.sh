#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or a used one.
#
# Install phase (needs the network; one at a time per checkout, under the
# lock .tests-install.lock):
#   1. installs the Debian packages of tests/debian-packages.txt that are
#      missing (needs root; waits up to 10 minutes for the dpkg lock);
#   2. creates the virtualenv .venv and installs the project with its
#      [pcsc,test] extras into it (again only when setup.cfg/pyproject.toml
#      changed since the last run);
#   3. provisions the original FoxyProxy 2.10 for the differential tests
#      (.venv-foxyproxy, its own virtualenv) and builds the project's wheel
#      for the packaging tests into this run's own directory, beside
#      pyscard's source for the fresh-venv PC/SC install test.
# Pytest phase (no network): pytest over tests/ (extra arguments go to
# pytest); as root it runs in a network namespace of its own with only
# loopback (unshare --net), which tests/test_offline.py checks.
# Exit status: pytest's (non-zero on any failure, 5 if no test ran).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
started=$(date +%s)
say() { echo "tests/run.sh: $*"; }

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/cloudfoxy-tests.XXXXXX")  # this run's own files
trap 'rm -rf "$run_dir"' EXIT

exec 9>"$ROOT/.tests-install.lock"
if ! flock -n 9; then
    say "another run of this checkout is installing; waiting (up to 20 min)"
    flock -w 1200 9 || { say "gave up waiting for $ROOT/.tests-install.lock" >&2; exit 2; }
fi

mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' tests/debian-packages.txt)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        say "missing Debian packages: ${missing[*]}; run as root or install them" >&2
        exit 2
    fi
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # another apt-get/dpkg may hold the lock: wait for it (bounded) instead of failing
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
else
    say "Debian packages: all ${#packages[@]} installed"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-64)
if [ "$(cat .venv/.tests-installed 2>/dev/null)" != "$stamp" ]; then
    say "installing into .venv: pip, setuptools, wheel, and -e '.[pcsc,test]'"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 'setuptools>=64' wheel
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[pcsc,test]'
    echo "$stamp" > .venv/.tests-installed
else
    say ".venv: up to date with setup.cfg and pyproject.toml"
fi
say "provisioning FoxyProxy 2.10 (.venv-foxyproxy) and the project's wheel ($run_dir/wheels)"
.venv/bin/python tests/provision.py "$run_dir/wheels"
flock -u 9
installed=$(date +%s)
say "install phase: $((installed - started)) s"

export CLOUDFOXY_TEST_WHEELS="$run_dir/wheels"
pytest=(.venv/bin/python -m pytest -p no:cacheprovider -ra tests "$@")
status=0
if [ "$(id -u)" -eq 0 ] && unshare --net true 2>/dev/null; then
    say "pytest phase: in a network namespace with only loopback (unshare --net)"
    unshare --net -- bash -c 'ip link set lo up && CLOUDFOXY_TESTS_NETNS=1 exec "$@"' pytest "${pytest[@]}" \
        || status=$?
else
    say "pytest phase: in this network namespace (not root: no unshare --net)"
    "${pytest[@]}" || status=$?
fi
say "pytest phase: $(($(date +%s) - installed)) s; whole run: $(($(date +%s) - started)) s; exit $status"
exit $status
