//! A server process starts, serves its schema and survives a restart.

use ferry_e2e::{Backend, ServerProcess, token};
use ferry_protocol::{Encoding, ErrorBody, ErrorCode, Schema};
use ferry_server::backend_tests;

async fn start(backend: Backend) -> Option<ServerProcess> {
    let database = backend.database().await?;
    Some(ServerProcess::start(&database, &[]).expect("server starts"))
}

backend_tests! {
    async fn a_fresh_server_answers_health_and_serves_the_schema(backend) {
        let Some(server) = start(backend).await else { return };
        let http = reqwest::Client::new();
        let health = http.get(format!("{}/healthz", server.url)).send().await.unwrap();
        assert_eq!(health.status(), 200);
        for encoding in [Encoding::Json, Encoding::Postcard] {
            let res = http
                .get(format!("{}/v1/schema", server.url))
                .header("accept", encoding.media_type())
                .bearer_auth(token("alice"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            let schema: Schema = encoding.decode(&res.bytes().await.unwrap(), 1 << 20).unwrap();
            assert!(schema.table("invoice_line").is_some());
        }
        let res = http
            .get(format!("{}/v1/schema", server.url))
            .header("accept", "text/csv")
            .bearer_auth(token("alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 406);
        let err: ErrorBody = Encoding::Json.decode(&res.bytes().await.unwrap(), 1 << 20).unwrap();
        assert_eq!(err.code, ErrorCode::NotAcceptable);
    }

    async fn a_restarted_server_keeps_its_database(backend) {
        let Some(mut server) = start(backend).await else { return };
        let first = server.url.clone();
        server.restart().expect("restart");
        let health = reqwest::get(format!("{}/readyz", server.url)).await.unwrap();
        assert_eq!(health.status(), 200, "restarted server (was {first})");
    }
}

backend_tests! {
    async fn metrics_expose_the_named_series_after_a_sync(backend) {
        let Some(server) = start(backend).await else { return };
        let dir = tempfile::tempdir().unwrap();
        let config = ferry_client::ClientConfig { token: Some(token("alice")), ..ferry_client::ClientConfig::new(&server.url) };
        let device = ferry_client::Client::open(dir.path().join("d.db"), config).unwrap();
        device.connect_schema().await.unwrap();
        device.transaction(|tx| tx.execute("INSERT INTO customer (name) VALUES ('Ada')", []).map(drop)).unwrap();
        device.sync().await.unwrap();
        let text = reqwest::get(format!("{}/metrics", server.url)).await.unwrap().text().await.unwrap();
        for series in [
            "ferry_batches_total{result=\"applied\"}",
            "ferry_events_total{table=\"customer\",outcome=\"applied\"}",
            "ferry_key_remaps_total",
            "ferry_rows_received_total{kind=\"upsert\"}",
            "ferry_http_request_duration_seconds_bucket{route=\"/v1/batches\"",
            "ferry_http_requests_total{route=\"/v1/changes\",status=\"200\"}",
        ] {
            assert!(text.contains(series), "missing {series} in:\n{text}");
        }
    }
}
