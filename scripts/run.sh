#!/usr/bin/env bash
# The project's run command (README): builds the bundled connectors and the release binary,
# then serves on 127.0.0.1:8080 with the embedded SQLite store (./lockstep.db) and the
# connector manifests of examples/connectors.d (only `*.toml` files load; the webhook example
# ships as `webhook.toml.example`, so nothing is delivered until you copy it to webhook.toml,
# which the running service picks up without a restart).
# Without LOCKSTEP_ADMIN_TOKEN or API keys, the service prints a fresh bootstrap admin token
# when its output is a terminal; otherwise (piped, logged) it writes it to
# ./lockstep-admin-token (mode 0600) and prints only that path.
# Extra arguments go to `lockstep serve` (e.g. --listen, --database-url, --config).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "run.sh: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi
# build-connectors adds the wasm32-wasip2 target with rustup when it is missing.
cargo xtask build-connectors
cargo build --release -p lockstep
# Where cargo put it: the target directory may be elsewhere (CARGO_TARGET_DIR).
exec "${CARGO_TARGET_DIR:-target}/release/lockstep" serve --connectors-dir examples/connectors.d "$@"
