//! The `/metrics` HTTP endpoint (plain HTTP/1.1 on `--metrics-addr`).

use std::future::Future;
use std::net::SocketAddr;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::Metrics;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the metrics listener (separately from [`serve`], so that a bad address fails
/// the daemon's start rather than a background task).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    // Encoding reads the engine, which may block on its locks.
                    match tokio::task::spawn_blocking(move || metrics.encode()).await {
                        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
                        Err(err) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("cannot encode metrics: {err}\n"),
                        )
                            .into_response(),
                    }
                }
            }),
        )
        .route("/", get(|| async { "blockd: metrics are at /metrics\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_the_text_format() {
        let metrics = Metrics::new();
        metrics.record_rpc(
            "GetStatus",
            tonic::Code::Ok,
            std::time::Duration::from_millis(1),
        );
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, metrics, async {
            let _ = stopped.await;
        }));

        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains(CONTENT_TYPE), "{response}");
        assert!(
            response.contains("blockd_api_requests_total{method=\"GetStatus\",code=\"Ok\"} 1"),
            "{response}"
        );

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
