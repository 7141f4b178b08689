//! Security, end to end (issue 6, DESIGN.md R15): HTTPS with a private CA, bad tokens, device
//! hijacking, request limits and hostile identifiers, against the real `ferry-server` binary.
//! Two-user scope isolation on receive is `receive::scopes_two_salespeople_and_a_reassigned_invoice`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_client::ferry_protocol::{Batch, ErrorBody, ErrorCode, Event, FailureCode, Key, Op, Outcome, Row, Value};
use ferry_client::{Client, ClientConfig, Error, EventStatus, Transport};
use ferry_e2e::device::local_i64;
use ferry_e2e::{ServerProcess, Site, TEST_SECRET, token};
use ferry_server::backend_tests;

/// An HS256 token with arbitrary claims, signed with `secret`.
fn signed(claims: serde_json::Value, secret: &str) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Sends a request as-is and returns its status, its error body (if the answer is one) and the
/// `x-request-id` header.
async fn call(req: reqwest::RequestBuilder) -> (u16, Option<ErrorBody>, Option<String>) {
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let request_id = res.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let bytes = res.bytes().await.unwrap();
    let body = ferry_client::ferry_protocol::Encoding::Json.decode::<ErrorBody>(&bytes, 1 << 20).ok();
    (status, body, request_id)
}

/// Asserts a 401 with a typed `unauthorized` body carrying the response's request id.
async fn assert_401(req: reqwest::RequestBuilder, case: &str) {
    let (status, body, request_id) = call(req).await;
    assert_eq!(status, 401, "{case}");
    let body = body.unwrap_or_else(|| panic!("{case}: no typed error body"));
    assert_eq!(body.code, ErrorCode::Unauthorized, "{case}: {body:?}");
    assert!(body.request_id.as_deref().is_some_and(|id| !id.is_empty()), "{case}: {body:?}");
    assert_eq!(body.request_id, request_id, "{case}: the body carries the logged request id");
    assert!(!body.message.contains(TEST_SECRET), "{case}");
}

fn row(pairs: &[(&str, Value)]) -> Row {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn insert_event(seq: u64, table: &str, values: Row) -> Event {
    Event {
        seq,
        tx: seq,
        table: table.into(),
        op: Op::Insert,
        key: Key::int(-(seq as i64)),
        values,
        base_version: None,
        changed: vec![],
        previous: Row::new(),
    }
}

fn insert_customer(c: &Client, name: &str, city: &str) {
    c.transaction(|tx| tx.execute("INSERT INTO customer (name, city) VALUES (?1, ?2)", [name, city])).unwrap();
}

backend_tests! {
    // HTTPS with a certificate made by the test: a device trusting it syncs; one that does not
    // fails with a transport error (and nothing reaches the server).
    async fn https_sync_with_a_private_ca(backend) {
        let Some(database) = backend.database().await else { return };
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert_pem = cert.cert.pem();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, &cert_pem).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        let server = ServerProcess::start(
            &database,
            &["--tls-cert", cert_path.to_str().unwrap(), "--tls-key", key_path.to_str().unwrap()],
        )
        .unwrap();
        assert!(server.url.starts_with("https://127.0.0.1:"), "{}", server.url);
        let config = |user: &str, ca: Option<&str>| ClientConfig {
            token: Some(token(user)),
            max_attempts: 1,
            request_timeout: Duration::from_secs(10),
            extra_ca_pem: ca.map(|p| p.as_bytes().to_vec()),
            ..ClientConfig::new(&server.url)
        };

        let a = Client::open(dir.path().join("a.db"), config("alice", Some(&cert_pem))).unwrap();
        a.connect_schema().await.unwrap();
        insert_customer(&a, "Ada", "Paris");
        let report = a.sync().await.unwrap();
        assert_eq!(report.send.events_applied, 1);
        let b = Client::open(dir.path().join("b.db"), config("bob", Some(&cert_pem))).unwrap();
        b.connect_schema().await.unwrap();
        let store = ferry_server::store::Store::open(&server.database).await.unwrap();
        ferry_e2e::device::settle(&store).await;
        let report = b.sync().await.unwrap();
        assert_eq!(report.receive.rows_upserted, 1);
        assert_eq!(local_i64(&b, "SELECT count(*) FROM customer WHERE name = 'Ada'"), 1);

        // Without the CA: the certificate is not trusted.
        let untrusting = Client::open(dir.path().join("c.db"), config("alice", None)).unwrap();
        match untrusting.connect_schema().await {
            Err(Error::Transport(_)) => {}
            other => panic!("expected a transport error, got {other:?}"),
        }
        untrusting.install_schema(&a.schema().unwrap().unwrap()).unwrap();
        insert_customer(&untrusting, "Eve", "Nowhere");
        match untrusting.send().await {
            Err(Error::Unreachable { .. }) => {}
            other => panic!("expected the send to fail on the transport, got {other:?}"),
        }
        assert!(matches!(untrusting.receive().await, Err(Error::Unreachable { .. } | Error::Transport(_))));
        // Plain HTTP to the HTTPS port gets nowhere either.
        let plain = server.url.replace("https://", "http://");
        let err = Transport::new(plain, Some(token("alice"))).unwrap().fetch_schema().await.unwrap_err();
        assert!(matches!(err, Error::Transport(_)), "{err:?}");
        assert_eq!(store.query_i64("SELECT count(*) FROM customer WHERE name = 'Eve'").await.unwrap(), 0);
    }

    // 401 for a missing, malformed, forged, expired, wrong-audience token, on every endpoint; the
    // client surfaces it as a typed refusal.
    async fn bad_tokens_get_401_with_a_typed_body(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        let http = reqwest::Client::new();
        let url = &site.server.url;
        let forged = ferry_server::auth::Auth::hs256(b"another-secret-another-secret-another")
            .unwrap()
            .issue("alice", Duration::from_secs(3600))
            .unwrap();
        let expired = signed(serde_json::json!({"sub": "alice", "exp": now() - 3600}), TEST_SECRET);
        let no_sub = signed(serde_json::json!({"exp": now() + 3600}), TEST_SECRET);
        let not_yet = signed(serde_json::json!({"sub": "alice", "exp": now() + 7200, "nbf": now() + 3600}), TEST_SECRET);
        assert!(!token("alice").is_empty());
        let requests = |auth: Option<String>| {
            let with = |r: reqwest::RequestBuilder| match &auth {
                Some(a) => r.header("authorization", a.clone()),
                None => r,
            };
            vec![
                ("schema", with(http.get(format!("{url}/v1/schema")))),
                ("estimate", with(http.get(format!("{url}/v1/changes/estimate?cursor=")))),
                ("changes", with(http.get(format!("{url}/v1/changes?cursor=&limit=10")))),
                (
                    "batches",
                    with(http.post(format!("{url}/v1/batches")).header("content-type", "application/json").body("{}")),
                ),
            ]
        };
        let cases = [
            ("missing", None),
            ("not bearer", Some(format!("Basic {}", "YWxpY2U6cHc="))),
            ("malformed", Some("Bearer not.a.jwt".to_string())),
            ("forged", Some(format!("Bearer {forged}"))),
            ("expired", Some(format!("Bearer {expired}"))),
            ("no subject", Some(format!("Bearer {no_sub}"))),
            ("not valid yet", Some(format!("Bearer {not_yet}"))),
        ];
        for (case, auth) in cases {
            for (endpoint, req) in requests(auth) {
                assert_401(req, &format!("{case} token on {endpoint}")).await;
            }
        }
        // The health check needs no token.
        assert_eq!(call(http.get(format!("{url}/healthz"))).await.0, 200);

        // Through the client: a typed refusal, not a retry loop.
        let config = ClientConfig { token: Some(expired.clone()), ..site.config(url, "alice") };
        let dev = site.device_with("d", config);
        match dev.receive().await {
            Err(Error::Refused(body)) => assert_eq!(body.code, ErrorCode::Unauthorized),
            other => panic!("expected a 401 refusal, got {other:?}"),
        }
        insert_customer(&dev, "Ada", "Paris");
        match dev.send().await {
            Err(Error::Refused(body)) => assert_eq!(body.code, ErrorCode::Unauthorized),
            other => panic!("expected a 401 refusal, got {other:?}"),
        }
        assert_eq!(site.server_i64("SELECT count(*) FROM customer").await, 0);

    }

    // A server configured with --jwt-audience and --jwt-issuer accepts only tokens carrying that
    // audience and that issuer: a wrong value and a missing claim are both refused.
    async fn a_configured_audience_and_issuer_are_required(backend) {
        let Some(database) = backend.database().await else { return };
        let strict = ServerProcess::start(&database, &["--jwt-audience", "ferry", "--jwt-issuer", "https://idp.test"]).unwrap();
        let http = reqwest::Client::new();
        let status = |claims: serde_json::Value| {
            let req = http.get(format!("{}/v1/schema", strict.url)).bearer_auth(signed(claims, TEST_SECRET));
            async move { call(req).await }
        };
        let (exp, sub) = (now() + 600, "alice");
        let (ok, _, _) = status(serde_json::json!({"sub": sub, "exp": exp, "aud": "ferry", "iss": "https://idp.test"})).await;
        assert_eq!(ok, 200);
        for (case, claims) in [
            ("wrong audience", serde_json::json!({"sub": sub, "exp": exp, "aud": "other", "iss": "https://idp.test"})),
            ("wrong issuer", serde_json::json!({"sub": sub, "exp": exp, "aud": "ferry", "iss": "https://evil.test"})),
        ] {
            let req = http.get(format!("{}/v1/schema", strict.url)).bearer_auth(signed(claims, TEST_SECRET));
            assert_401(req, case).await;
        }
        // Missing claims: checked together so that a failure names every case that got through.
        let mut accepted = Vec::new();
        for (case, claims) in [
            ("no aud", serde_json::json!({"sub": sub, "exp": exp, "iss": "https://idp.test"})),
            ("no iss", serde_json::json!({"sub": sub, "exp": exp, "aud": "ferry"})),
            ("neither", serde_json::json!({"sub": sub, "exp": exp})),
        ] {
            let (code, body, _) = status(claims).await;
            if code != 401 || body.map(|b| b.code) != Some(ErrorCode::Unauthorized) {
                accepted.push(format!("{case}: HTTP {code}"));
            }
        }
        assert!(accepted.is_empty(), "tokens lacking a configured claim were not refused with 401: {accepted:?}");
    }

    // 403: bob presents alice's device id — a new batch, and a replay of one she sent (whose
    // stored result he must not read). Nothing of his applies; alice carries on.
    async fn another_users_device_id_is_forbidden(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        let alice = site.device("alice", "alice");
        insert_customer(&alice, "Ada", "Paris");
        let first = alice.next_batch().unwrap().unwrap();
        assert_eq!(alice.send().await.unwrap().events_applied, 1);

        insert_customer(&alice, "Grace", "Oslo");
        let second = alice.next_batch().unwrap().unwrap();
        let bob = Transport::new(site.server.url.clone(), Some(token("bob"))).unwrap();
        for (what, batch) in [("a new batch", &second), ("a replay", &first)] {
            match bob.upload(batch).await {
                Err(ferry_client::UploadError::Refused(body)) => {
                    assert_eq!(body.code, ErrorCode::Forbidden, "{what}: {body:?}");
                    assert!(body.request_id.is_some());
                }
                other => panic!("{what}: expected 403, got {other:?}"),
            }
        }
        // The raw status, too.
        let body = ferry_client::ferry_protocol::Encoding::Json.encode(&second).unwrap();
        let (status, err, _) = call(
            reqwest::Client::new()
                .post(format!("{}/v1/batches", site.server.url))
                .bearer_auth(token("bob"))
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
        assert_eq!((status, err.map(|e| e.code)), (403, Some(ErrorCode::Forbidden)));
        assert_eq!(site.server_i64("SELECT count(*) FROM customer").await, 1, "nothing of bob's applied");

        assert_eq!(alice.send().await.unwrap().events_applied, 1, "alice's device still works");
        assert_eq!(site.server_i64("SELECT count(*) FROM customer").await, 2);
    }

    // 413: a body over --max-body-bytes, a batch over --max-batch-events, a page over
    // --max-page-rows; each refusal names its limit, and nothing is applied.
    async fn oversized_requests_get_413_with_the_limit(backend) {
        let Some(site) = Site::start(
            backend,
            &["--max-body-bytes", "2048", "--max-batch-events", "5", "--max-page-rows", "100"],
        )
        .await
        else {
            return;
        };
        let refused = |r: Result<_, Error>, what: &str| -> ErrorBody {
            match r {
                Err(Error::Refused(body)) => {
                    assert_eq!(body.code, ErrorCode::PayloadTooLarge, "{what}: {body:?}");
                    body
                }
                Err(other) => panic!("{what}: expected a 413 refusal, got {other:?}"),
                Ok(_) => panic!("{what}: expected a 413 refusal, it succeeded"),
            }
        };

        let big = site.device("big", "alice");
        insert_customer(&big, &"x".repeat(3000), "Paris");
        let body = refused(big.send().await.map(drop), "a 3,000-byte name");
        assert_eq!(body.limit, Some(2048));
        assert_eq!(big.events(EventStatus::InFlight).unwrap().len(), 1, "the batch stays for the app to deal with");

        let many = site.device("many", "alice");
        many.transaction(|tx| {
            for i in 0..6 {
                tx.execute("INSERT INTO customer (name, city) VALUES (?1, 'Paris')", [format!("c{i}")])?;
            }
            Ok(())
        })
        .unwrap();
        let body = refused(many.send().await.map(drop), "six events in one transaction");
        assert_eq!(body.limit, Some(5));
        assert_eq!(site.server_i64("SELECT count(*) FROM customer").await, 0);

        let greedy = site.device_with("greedy", ClientConfig { page_limit: 101, ..site.config(&site.server.url, "alice") });
        let body = refused(greedy.receive().await.map(drop), "101 rows a page");
        assert_eq!(body.limit, Some(100));
        let modest = site.device_with("modest", ClientConfig { page_limit: 100, ..site.config(&site.server.url, "alice") });
        modest.receive().await.unwrap();
    }

    // SQL-injection strings are inert: in values they round-trip byte for byte; as table or
    // column names they are unknown identifiers failing their own event.
    async fn injection_strings_are_inert(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        let hostile = [
            ("Robert'); DROP TABLE customer;--", "'; DELETE FROM invoice; --"),
            ("x\" OR \"1\"=\"1", "%' OR 1=1 --"),
            ("back\\slash $1 ?1 :name", "Ünïcode ☃ \t tab"),
        ];
        let a = site.device("a", "alice");
        for (name, city) in hostile {
            insert_customer(&a, name, city);
        }
        assert_eq!(a.send().await.unwrap().events_applied, 3);
        let b = site.device("b", "bob");
        site.settle().await;
        assert_eq!(b.receive().await.unwrap().rows_upserted, 3);
        for (name, city) in hostile {
            let rows = b.query_rows("SELECT city FROM customer WHERE name = ?1", [name]).unwrap();
            assert_eq!(rows.len(), 1, "{name:?} arrived");
            assert_eq!(rows[0].get("city"), Some(&Value::Text(city.into())), "{name:?}");
        }
        assert_eq!(site.server_i64("SELECT count(*) FROM customer WHERE name = 'Robert''); DROP TABLE customer;--'").await, 1);

        // Hostile identifiers, in a batch built by hand (the client only sends schema names).
        let c = site.device("c", "alice");
        let events = vec![
            insert_event(1, "customer; DROP TABLE x", row(&[("id", Value::Integer(-1)), ("name", Value::Text("t".into()))])),
            insert_event(2, "customer", row(&[
                ("id", Value::Integer(-2)),
                ("name", Value::Text("c".into())),
                ("name\"; DROP TABLE customer; --", Value::Text("v".into())),
            ])),
            insert_event(3, "customer\"", row(&[("id", Value::Integer(-3)), ("name", Value::Text("q".into()))])),
            insert_event(4, "customer", row(&[("id", Value::Integer(-4)), ("name", Value::Text("fine".into()))])),
        ];
        let batch = Batch::new(c.device_id().unwrap(), 1, site.schema.version.clone(), events);
        let result = Transport::new(site.server.url.clone(), Some(token("alice"))).unwrap().upload(&batch).await.unwrap();
        let codes: Vec<Option<FailureCode>> = result
            .outcomes
            .iter()
            .map(|o| match &o.outcome {
                Outcome::Failed(f) => Some(f.code),
                _ => None,
            })
            .collect();
        assert_eq!(
            codes,
            vec![Some(FailureCode::UnknownTable), Some(FailureCode::UnknownColumn), Some(FailureCode::UnknownTable), None]
        );
        assert_eq!(site.server_i64("SELECT count(*) FROM customer").await, 4, "the tables are intact");
        assert_eq!(site.server_i64("SELECT count(*) FROM customer WHERE name = 'fine'").await, 1);
        assert_eq!(local_i64(&a, "SELECT count(*) FROM customer"), 3);
    }
}
