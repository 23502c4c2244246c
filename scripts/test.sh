#!/usr/bin/env bash
# The project's single test command (README: `bash scripts/test.sh`; CI runs exactly this).
#
# Checks formatting and lints, builds the connector components the tests load, then runs
# every test, then fuzzes the HTTP API against its OpenAPI document (scripts/fuzz-api.sh,
# about 2.5 minutes). Tests run each scenario on SQLite and on PostgreSQL: the PostgreSQL
# URL comes from LOCKSTEP_TEST_DATABASE_URL or DATABASE_URL when the caller sets one;
# otherwise the throwaway cluster of scripts/pg.sh (PGPORT, default 55432) is used: reused if
# already running, else started here and always stopped on exit.
# Likewise the test Keycloak of `cargo xtask keycloak` (127.0.0.1:18180, realm
# tests/keycloak/acme-realm.json, its data in the database lockstep_keycloak of that same
# PostgreSQL, so it starts after it and stops before it): reused if already running, else
# started here and stopped on exit; its URL reaches the tests as LOCKSTEP_TEST_KEYCLOAK_URL
# (a caller's own value wins), its HTTPS listener's as LOCKSTEP_TEST_KEYCLOAK_HTTPS_URL with
# the test CA it was started with in LOCKSTEP_TEST_KEYCLOAK_CA_FILE.
# LOCKSTEP_SKIP_KEYCLOAK=1 skips it (the Keycloak tests then say they are skipped).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

STARTED=$SECONDS
# Each step also says how much disk is left: a fresh build of every test binary is large.
step() {
    local free
    free="$(df -h --output=avail . 2>/dev/null | tail -n 1 | tr -d ' ')" || free="?"
    printf '\n==> [%3ds] [%s free] %s\n' "$((SECONDS - STARTED))" "${free:-?}" "$*"
}

# What the EXIT trap undoes, last started first (Keycloak, then PostgreSQL).
CLEANUP=()
cleanup() {
    local i
    for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do
        eval "${CLEANUP[i]}" || true
    done
}
trap cleanup EXIT
# Ctrl-C / SIGTERM become a normal exit so the EXIT trap still stops PostgreSQL and Keycloak.
trap 'exit 130' INT
trap 'exit 143' TERM

step "toolchain: rustfmt, clippy, wasm32-wasip2"
if command -v rustup >/dev/null 2>&1; then
    installed="$(rustup component list --installed)"
    for component in rustfmt clippy; do
        if ! grep -q "^$component" <<<"$installed"; then
            rustup component add "$component"
        fi
    done
    targets="$(rustup target list --installed)"
    if ! grep -qx wasm32-wasip2 <<<"$targets"; then
        rustup target add wasm32-wasip2
    fi
fi
cargo --version
cargo fmt --version
cargo clippy --version

step "JavaScript and Python toolchain hosts: node, npm, python3 (venv); chromium for the console"
# `lockstep connector build` installs the pinned componentize-js (npm) and componentize-py
# (PyPI) itself, under target/lockstep-tools in the tests; it needs Node.js with npm and a
# Python 3 that can make a venv.
missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# The console's end-to-end test drives Debian's Chromium through chromedriver; nothing
# downloads a browser of its own.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if ((${#missing[@]})); then
    echo "installing ${missing[*]} with apt-get"
    sudo=(); [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
node --version
npm --version
python3 --version
chromedriver --version

step "jwcrypto for the SSF receiver's tests (a repo-local venv)"
# The receiver's tests verify SETs minted by a JOSE implementation that shares nothing with
# Lockstep's (Python's jwcrypto, pinned); kept under target/ between runs.
JOSE_VENV=target/jose-venv
if ! "$JOSE_VENV/bin/python" -c 'import jwcrypto' >/dev/null 2>&1; then
    python3 -m venv "$JOSE_VENV"
    "$JOSE_VENV/bin/pip" install --quiet --disable-pip-version-check \
        "jwcrypto==1.6.1" "cryptography==50.0.2"
fi
LOCKSTEP_TEST_PYTHON="$(pwd)/$JOSE_VENV/bin/python"
export LOCKSTEP_TEST_PYTHON
"$LOCKSTEP_TEST_PYTHON" -c 'import jwcrypto; print("jwcrypto", jwcrypto.__version__ if hasattr(jwcrypto, "__version__") else "")'

step "PostgreSQL"
if [[ -n "${LOCKSTEP_TEST_DATABASE_URL:-}" ]]; then
    echo "using LOCKSTEP_TEST_DATABASE_URL from the caller"
elif [[ -n "${DATABASE_URL:-}" ]]; then
    echo "using DATABASE_URL from the caller"
    export LOCKSTEP_TEST_DATABASE_URL="$DATABASE_URL"
elif bash scripts/pg.sh status >/dev/null 2>&1; then
    # Someone started it by hand (scripts/pg.sh start): use it and leave it running.
    echo "reusing the running cluster on port ${PGPORT:-55432}"
else
    CLEANUP+=('bash scripts/pg.sh stop')
    bash scripts/pg.sh start
fi
if [[ -z "${LOCKSTEP_TEST_DATABASE_URL:-}" ]]; then
    LOCKSTEP_TEST_DATABASE_URL="$(bash scripts/pg.sh url)"
    export LOCKSTEP_TEST_DATABASE_URL
fi

step "Keycloak"
if [[ "${LOCKSTEP_SKIP_KEYCLOAK:-0}" == 1 ]]; then
    echo "LOCKSTEP_SKIP_KEYCLOAK=1: not starting Keycloak; its tests will be skipped"
    unset LOCKSTEP_TEST_KEYCLOAK_URL
elif [[ -n "${LOCKSTEP_TEST_KEYCLOAK_URL:-}" ]]; then
    echo "using LOCKSTEP_TEST_KEYCLOAK_URL from the caller"
else
    if cargo xtask keycloak status >/dev/null; then
        # Someone started it by hand (cargo xtask keycloak start): use it and leave it running.
        echo "reusing the running Keycloak"
    else
        CLEANUP+=('cargo xtask keycloak stop')
        # The event extension builds with Maven on a JDK 17; Keycloak 26.7 itself runs on a
        # JDK 21 or later, which `cargo xtask keycloak start` looks for in /usr/lib/jvm (or
        # KEYCLOAK_JAVA_HOME).
        sudo=(); [[ "$(id -u)" == 0 ]] || sudo=(sudo)
        if ! command -v mvn >/dev/null 2>&1 || ! command -v javac >/dev/null 2>&1; then
            echo "installing Maven and a JDK 17 with apt-get"
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y maven openjdk-17-jdk-headless
        fi
        jdk21=""
        for release in /usr/lib/jvm/*/release; do
            major="$(sed -n 's/^JAVA_VERSION="\([0-9]*\).*/\1/p' "$release" 2>/dev/null)"
            if [[ -n "$major" && "$major" -ge 21 ]]; then jdk21="$release"; fi
        done
        if [[ -z "${KEYCLOAK_JAVA_HOME:-}" && -z "$jdk21" ]]; then
            echo "installing a JDK 21 for Keycloak with apt-get"
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y openjdk-21-jdk-headless
        fi
        cargo xtask keycloak start
    fi
    LOCKSTEP_TEST_KEYCLOAK_URL="$(cargo xtask keycloak url)"
    LOCKSTEP_TEST_KEYCLOAK_HTTPS_URL="$(cargo xtask keycloak url --https)"
    LOCKSTEP_TEST_KEYCLOAK_CA_FILE="$(cargo xtask keycloak ca-file)"
    export LOCKSTEP_TEST_KEYCLOAK_URL LOCKSTEP_TEST_KEYCLOAK_HTTPS_URL LOCKSTEP_TEST_KEYCLOAK_CA_FILE
fi

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo xtask build-connectors"
cargo xtask build-connectors

step "cargo test --workspace"
cargo test --workspace

step "API fuzzing: bash scripts/fuzz-api.sh (schemathesis against a real lockstep serve)"
# The binary cargo test just built: `cargo build -p lockstep` resolves features for one
# package, not the workspace, and could rebuild it.
# A fixed seed by default, so the test command is reproducible (a time budget still decides how
# far it gets); set LOCKSTEP_FUZZ_SEED to explore other inputs.
LOCKSTEP_FUZZ_SEED="${LOCKSTEP_FUZZ_SEED:-20261123}" LOCKSTEP_BIN="${CARGO_TARGET_DIR:-target}/debug/lockstep" \
    bash scripts/fuzz-api.sh

step "all checks passed"
