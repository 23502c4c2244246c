#!/usr/bin/env bash
# The project's single test command (README: `bash scripts/test.sh`; CI runs exactly this).
#
# Checks formatting and lints, builds the connector components the tests load, then runs
# every test. Tests run each scenario on SQLite and on
# PostgreSQL: the PostgreSQL URL comes from LOCKSTEP_TEST_DATABASE_URL or DATABASE_URL when the
# caller sets one; otherwise the throwaway cluster of scripts/pg.sh (PGPORT, default 55432) is
# used: reused if already running, else started here and always stopped on exit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

STARTED=$SECONDS
step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - STARTED))" "$*"; }

# Ctrl-C / SIGTERM become a normal exit so the EXIT trap below still stops PostgreSQL.
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
    trap 'bash scripts/pg.sh stop || true' EXIT
    bash scripts/pg.sh start
fi
if [[ -z "${LOCKSTEP_TEST_DATABASE_URL:-}" ]]; then
    LOCKSTEP_TEST_DATABASE_URL="$(bash scripts/pg.sh url)"
    export LOCKSTEP_TEST_DATABASE_URL
fi

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo xtask build-connectors"
cargo xtask build-connectors

step "cargo test --workspace"
cargo test --workspace

step "all checks passed"
