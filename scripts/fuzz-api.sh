#!/usr/bin/env bash
# API fuzzing: schemathesis against the OpenAPI document that a real `lockstep serve`
# serves at /openapi.json. Fails on any 5xx and on any response the document does not describe
# (status code, content type, headers, body schema), and on the data checks (schema-valid input
# refused, schema-invalid input accepted, ...) — every schemathesis check is on, except where
# scripts/fuzz-api.toml says why for one operation.
#
#   bash scripts/fuzz-api.sh                 # what scripts/test.sh runs
#   LOCKSTEP_FUZZ_SEED=123 bash scripts/fuzz-api.sh   # replay a run (the seed is printed)
#
# Two schemathesis runs against the same server, each with its own time budget (one budget
# would be eaten by the fuzzing phase, which repeats until it is spent): the per-operation
# phases (examples, coverage: boundary and invalid values of every parameter, fuzzing), then
# the stateful phase, which follows the document's links (map-parent → get, tree, receipt,
# map-child, destroy...) so that it works on sessions that exist.
#
# Knobs (env): LOCKSTEP_FUZZ_MAX_EXAMPLES (default 40 per operation and phase),
# LOCKSTEP_FUZZ_TIME and LOCKSTEP_FUZZ_STATEFUL_TIME (seconds, default 100 and 50: the whole
# script stays well under 5 minutes on 2 cores), LOCKSTEP_FUZZ_SEED, LOCKSTEP_FUZZ_WORKERS
# (default 1), LOCKSTEP_BIN (a built `lockstep` to use instead of building
# target/debug/lockstep).
#
# What it sets up, all removed on exit: a Python venv with a pinned schemathesis under
# target/fuzz-venv (kept between runs; python3-venv and python3-pip come from apt-get when
# python3 cannot make one), a temp directory with a fresh SQLite database and a config file
# holding one API key (stored hashed with `lockstep hash-key`) with every permission in every
# realm (`realms = ["*"]`: the fuzzer picks realm names, and connectors:manage and an unscoped
# audit:read need "*"), and the server on 127.0.0.1 (a free port it picks itself).
# Reports (JUnit, NDJSON) go to target/fuzz-report/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCHEMATHESIS_VERSION=4.32.5
VENV=target/fuzz-venv
REPORT_DIR=target/fuzz-report
MAX_EXAMPLES=${LOCKSTEP_FUZZ_MAX_EXAMPLES:-40}
FUZZ_TIME=${LOCKSTEP_FUZZ_TIME:-100}
STATEFUL_TIME=${LOCKSTEP_FUZZ_STATEFUL_TIME:-50}
# One worker: with two, hypothesis (which parses lambdas with `ast` while generating) failed
# runs at random with "SystemError: AST constructor recursion depth mismatch", a CPython 3.11
# bug with `ast` in threads (python/cpython#106905); the server is not the bottleneck anyway.
WORKERS=${LOCKSTEP_FUZZ_WORKERS:-1}

STARTED=$SECONDS
say() { printf '==> [%3ds] fuzz: %s\n' "$((SECONDS - STARTED))" "$*"; }

WORK=""
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        # Graceful shutdown drains in-flight requests; give it a few seconds, then insist.
        for _ in $(seq 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ -n "$WORK" ]]; then
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- schemathesis in a repo-local venv ------------------------------------------------------
if [[ ! -x "$VENV/bin/schemathesis" ]] ||
    [[ "$("$VENV/bin/schemathesis" --version 2>/dev/null)" != *"$SCHEMATHESIS_VERSION"* ]]; then
    say "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        echo "installing python3-venv and python3-pip with apt-get"
        sudo=(); [[ "$(id -u)" == 0 ]] || sudo=(sudo)
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv python3-pip
    fi
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
"$VENV/bin/schemathesis" --version

# --- the server -------------------------------------------------------------------------------
if [[ -n "${LOCKSTEP_BIN:-}" ]]; then
    BIN=$LOCKSTEP_BIN
else
    say "cargo build -p lockstep"
    cargo build -q -p lockstep
    BIN="${CARGO_TARGET_DIR:-target}/debug/lockstep"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/lockstep-fuzz.XXXXXX")"
KEY="fuzz-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
HASH="$(printf '%s\n' "$KEY" | "$BIN" hash-key -)"
cat >"$WORK/lockstep.toml" <<EOF
[[api_keys]]
id = "fuzz"
sha256 = "$HASH"
realms = ["*"]
permissions = ["users:manage", "connectors:manage", "audit:read"]

[limits]
# The per-caller rate limit is tested by host/tests/all/limits.rs; here a 429 in the middle of a
# run would only hide what the request after it would have found.
requests_per_second = 0
# The same for the throttle of failed authentications (tested in host/tests/all/limits.rs): the
# fuzzer sends hundreds of requests without or with bad credentials on purpose, and each must
# be answered 401, not 429.
failed_auth_per_minute = 0
EOF

say "starting lockstep serve (SQLite in $WORK)"
env -u LOCKSTEP_ADMIN_TOKEN -u LOCKSTEP_REQUESTS_PER_SECOND RUST_LOG=warn \
    "$BIN" serve \
    --listen 127.0.0.1:0 \
    --config "$WORK/lockstep.toml" \
    --database-url "sqlite://$WORK/lockstep.db" \
    --compile-cache "$WORK/compile-cache" \
    >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!

ADDR=""
for _ in $(seq 300); do
    ADDR="$(sed -n 's/^listening on //p' "$WORK/server.out")"
    [[ -n "$ADDR" ]] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        cat "$WORK/server.log" >&2
        echo "lockstep exited before it was ready" >&2
        exit 1
    fi
    sleep 0.1
done
if [[ -z "$ADDR" ]]; then
    echo "lockstep did not say where it listens within 30 s" >&2
    exit 1
fi
say "lockstep listens on $ADDR"

# --- the runs ---------------------------------------------------------------------------------
# This run's reports only (the NDJSON event log is tens of MB).
rm -rf "$REPORT_DIR"
mkdir -p "$REPORT_DIR"
seed=()
[[ -n "${LOCKSTEP_FUZZ_SEED:-}" ]] && seed=(--seed "$LOCKSTEP_FUZZ_SEED")
status=0
run_schemathesis() {
    local phases=$1 budget=$2
    shift 2
    say "schemathesis: $phases (at most ${budget}s) $*"
    # No `--checks`: every check is on by default (4.32.5), and a CLI `--checks all` would
    # override the per-operation exceptions of fuzz-api.toml (it did: an ST302 that the file
    # switches off for map_child failed a CI run).
    "$VENV/bin/schemathesis" --config-file scripts/fuzz-api.toml run \
        "http://$ADDR/openapi.json" \
        --header "Authorization: Bearer $KEY" \
        --phases "$phases" \
        --max-examples "$MAX_EXAMPLES" \
        --max-time "$budget" \
        --workers "$WORKERS" \
        --request-timeout 10 \
        --generation-database none \
        --no-color \
        --report junit,ndjson \
        --report-dir "$REPORT_DIR" \
        "${seed[@]}" "$@" || status=$?
}
run_schemathesis examples,coverage,fuzzing "$FUZZ_TIME"
# The links (and the state worth following) are all under /admin/realms/; with every operation
# in the state machine, the 50 s went to chains through connectors and deliveries that a fuzzer
# cannot create, and no session link was followed.
run_schemathesis stateful "$STATEFUL_TIME" --include-path-regex '^/admin/realms/'

# A 5xx is logged by the server with its cause; show them whatever schemathesis said (the
# log's colour codes stripped first: they sit between a field's name and its value).
sed 's/\x1b\[[0-9;]*m//g' "$WORK/server.log" >"$WORK/server.txt"
if grep -q 'response status=5[0-9][0-9]\|panicked\|store failure' "$WORK/server.txt"; then
    echo "--- server errors logged during the run:" >&2
    grep 'response status=5[0-9][0-9]\|panicked\|store failure' "$WORK/server.txt" | head -50 >&2
    status=1
fi
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "lockstep died during the run:" >&2
    tail -50 "$WORK/server.log" >&2
    status=1
fi

if [[ $status -ne 0 ]]; then
    say "FAILED (schemathesis exit $status; reports in $REPORT_DIR)"
    exit "$status"
fi
say "passed: no 5xx, every response as documented"
