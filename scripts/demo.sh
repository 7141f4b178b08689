#!/usr/bin/env bash
# `just demo`: a field-sales day in under a minute. A server on the embedded SQLite default, two
# salespeople's devices (the `ferry` CLI, built on the public client API), and a short story:
# offline work, checkpoints splitting the upload, auto-numbered keys remapped, a sale that fails
# with a clear reason, a fix, and a receive that brings the server's truth back.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q -p ferry-server -p ferry-cli
bin="$PWD/target/debug"
work="$(mktemp -d)"
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

if [ -t 1 ]; then bold=$'\e[1m'; dim=$'\e[2m'; off=$'\e[0m'; else bold=""; dim=""; off=""; fi
say() { printf '\n%s%s%s\n' "$bold" "$*" "$off"; }
note() { printf '%s%s%s\n' "$dim" "$*" "$off"; }
run() { printf '%s$ %s%s\n' "$dim" "$*" "$off"; "$@" || true; }
ferry() { "$bin/ferry" "$@"; }
admin() { "$bin/ferry-server" "$@" --database "$work/server.db" 2>/dev/null; }

say "1. The server: example sales schema, embedded SQLite, a fresh secret"
"$bin/ferry-server" serve --database "$work/server.db" --jwt-secret-file "$work/secret" \
  --listen 127.0.0.1:0 >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 1 100); do grep -q '^listening on ' "$work/server.out" 2>/dev/null && break; sleep 0.1; done
url="$(sed -n 's/^listening on //p' "$work/server.out")"
note "serving on $url"
alice="$("$bin/ferry-server" token --user alice --jwt-secret-file "$work/secret")"
bob="$("$bin/ferry-server" token --user bob --jwt-secret-file "$work/secret")"
note "the back office stocks 3 espresso machines (devices may not write products):"
run admin sql "INSERT INTO product (id, name, price, stock) VALUES (1, 'Espresso machine', 249.0, 3), (2, 'Grinder', 89.0, 10)"

say "2. Two devices: each fetches the schema and receives the catalogue"
run ferry init --server "$url" --token "$alice" --db "$work/alice.db"
run ferry init --server "$url" --token "$bob" --db "$work/bob.db"
run ferry --db "$work/alice.db" receive
run ferry --db "$work/bob.db" receive

say "3. Offline. Bob sells 2 machines to a new customer: new rows get temporary (negative) keys"
run ferry --db "$work/bob.db" sql "INSERT INTO customer (name, city) VALUES ('Café Roma', 'Turin');
  INSERT INTO invoice (customer_id, salesperson_id) VALUES ((SELECT min(id) FROM customer), 'bob');
  INSERT INTO invoice_line (invoice_id, product_id, qty, price) VALUES ((SELECT min(id) FROM invoice), 1, 2, 249.0);"
note "a checkpoint ends a request here; then the day's location pings (write-only for devices):"
run ferry --db "$work/bob.db" checkpoint
run ferry --db "$work/bob.db" sql "INSERT INTO location_ping (salesperson_id, lat, lon, recorded_at) VALUES ('bob', 45.07, 7.68, '09:00'), ('bob', 45.08, 7.69, '09:05');"
run ferry --db "$work/bob.db" sql "SELECT id, name FROM customer"

say "4. Offline too, Alice sells 2 machines and a grinder in one local transaction"
run ferry --db "$work/alice.db" sql "INSERT INTO customer (name, city) VALUES ('Bar Milano', 'Milan');
  INSERT INTO invoice (customer_id, salesperson_id) VALUES ((SELECT min(id) FROM customer), 'alice');
  INSERT INTO invoice_line (invoice_id, product_id, qty, price) VALUES ((SELECT min(id) FROM invoice), 1, 2, 249.0);
  INSERT INTO invoice_line (invoice_id, product_id, qty, price) VALUES ((SELECT min(id) FROM invoice), 2, 1, 89.0);"

say "5. Bob is online first: two requests (the checkpoint), real keys come back"
run ferry --db "$work/bob.db" send
run ferry --db "$work/bob.db" sql "SELECT id, name FROM customer"
note "the customer, its invoice and the line now carry the server's keys — foreign keys included"

say "6. Alice sends: only 1 machine is left, so her transaction fails — as a whole"
run ferry --db "$work/alice.db" send
run ferry --db "$work/alice.db" failed list
note "the line failed the stock rule; the other events of her local transaction failed with it"

say "7. Alice sells 1 machine instead and retries: the transaction travels again"
seq="$(ferry --db "$work/alice.db" --json failed list | sed -n 's/.*"seq": *\([0-9]*\).*"failure_code": *"constraint".*/\1/p' | head -n1)"
if [ -z "$seq" ]; then
  seq="$(ferry --db "$work/alice.db" --json failed list | tr '{' '\n' | grep '"constraint"' | sed -n 's/.*"seq": *\([0-9]*\).*/\1/p' | head -n1)"
fi
run ferry --db "$work/alice.db" failed retry "$seq" --set qty=1
run ferry --db "$work/alice.db" send

say "8. Both receive the truth: stock is 0, each sees only their own invoices"
run ferry --db "$work/alice.db" sync
run ferry --db "$work/bob.db" sync
run ferry --db "$work/alice.db" sql "SELECT name, stock FROM product"
run ferry --db "$work/bob.db" sql "SELECT id, salesperson_id FROM invoice"
run ferry --db "$work/alice.db" status

say "Done. The same story, step by step: docs/getting-started.md"
