#!/usr/bin/env bash
# Set up the project (once; again only when pyproject.toml changes) and run one job.
#   ./dev.sh demo        the main job: the simulated PLC over OPC UA in lockstep, the runtime in closed loop against it, the batch report
#   ./dev.sh test        the default test suite (tests/ and hil_tests/, one worker per core; installs Debian's chromium for the browser tests if missing)
#   ./dev.sh lint        ruff (format and lint), mypy and the import-layer contracts
#   ./dev.sh bench       the benchmarks
#   ./dev.sh cli ARGS    any bioreactor-mpc command, e.g. ./dev.sh cli simulate --seed 7
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "dev.sh: Python 3.11 or newer is required (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

browser() {
    # The browser tests drive Debian's chromium with Playwright (no browser download from the internet).
    command -v chromium >/dev/null 2>&1 && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "dev.sh: installing Debian's chromium for the browser tests" >&2
    $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >&2
}

setup() {
    local stamp
    stamp="$( (cat pyproject.toml; echo "setup-v1") | sha256sum | cut -d' ' -f1)"
    if [ -x .venv/bin/python ] && [ "$(cat .venv/.setup-stamp 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    local python
    python="$(find_python)"
    echo "dev.sh: setting up .venv with $("$python" --version)" >&2
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
    echo "$stamp" > .venv/.setup-stamp
}

job="${1:-demo}"
[ $# -gt 0 ] && shift
setup
case "$job" in
    demo)  exec .venv/bin/bioreactor-mpc demo "$@" ;;
    # One pytest worker per core (at most 4: each batch test runs a PLC and a runtime of its own); worksteal keeps both busy to the end. -n 0 runs serially.
    test)  browser; exec .venv/bin/python -m pytest --numprocesses auto --maxprocesses 4 --dist worksteal "$@" ;;
    lint)  .venv/bin/ruff format --check . && .venv/bin/ruff check . && .venv/bin/mypy && exec .venv/bin/lint-imports ;;
    bench) exec .venv/bin/python benchmarks/run_all.py "$@" ;;
    cli)   exec .venv/bin/bioreactor-mpc "$@" ;;
    setup) exit 0 ;;
    *) echo "dev.sh: unknown job '$job' (demo, test, lint, bench, cli, setup)" >&2; exit 2 ;;
esac
