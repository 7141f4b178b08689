# Ferry's everyday commands. Install just with `pip install rust-just` (or `cargo install just --locked`).

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Run the server on the embedded SQLite default (ferry.db, example schema, 127.0.0.1:8080).
serve *ARGS:
    cargo run -p ferry-server -- serve {{ARGS}}

# Run every test (PostgreSQL variants run when DATABASE_URL is set).
test:
    cargo test --workspace

# End-to-end checks: real ferry-server processes and real devices, with faults in between.
e2e:
    cargo build -p ferry-server --bin ferry-server
    mkdir -p target
    cargo test -p ferry-e2e -- --test-threads 2 2>&1 | tee target/e2e.log
    bash scripts/e2e-summary.sh target/e2e.log

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Throughput figures (see docs/benchmarks.md): `just bench` (quick) or `just bench full`.
bench MODE="quick":
    cargo run --release -p ferry-e2e --bin ferry-bench -- {{MODE}}

# A field-sales day in under a minute: a server, two devices, offline work, a failure and its fix.
demo:
    bash scripts/demo.sh
