//! Prometheus text over plain HTTP/1.x: `GET /metrics` (and HEAD), nothing else.
//! Small on purpose: one request per connection, bounded headers, bounded time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::DaemonOps;

const MAX_HEAD: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 16;

/// Bind the metrics listener. Only loopback addresses unless `allow_remote`: the
/// metrics name images and mounts, which is not for the network by default.
pub async fn bind_metrics(addr: SocketAddr, allow_remote: bool) -> Result<TcpListener> {
    if !allow_remote && !addr.ip().is_loopback() {
        bail!("metrics address {addr} is not a loopback address (allow it explicitly)");
    }
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics address {addr}"))?;
    info!(addr = %l.local_addr()?, "metrics endpoint ready");
    Ok(l)
}

/// Answer `GET /metrics` with [`DaemonOps::metrics_text`] until `shutdown`.
pub async fn serve_metrics(
    ops: Arc<dyn DaemonOps>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return Ok(()),
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ops = ops.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(IO_TIMEOUT * 2, handle(ops, stream)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics request failed"),
                Err(_) => debug!(%peer, "metrics request timed out"),
            }
        });
    }
}

async fn handle(ops: Arc<dyn DaemonOps>, mut stream: TcpStream) -> Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= MAX_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", b"").await;
        }
        let n = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf)).await??;
        if n == 0 {
            bail!("connection closed before the request was complete");
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return respond(&mut stream, "400 Bad Request", "", b"bad request\n").await;
    };
    if !version.starts_with("HTTP/1.") {
        return respond(&mut stream, "400 Bad Request", "", b"bad request\n").await;
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return respond(
            &mut stream,
            "404 Not Found",
            "",
            b"not found; try /metrics\n",
        )
        .await;
    }
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            b"",
        )
        .await;
    }
    let text = tokio::task::spawn_blocking(move || ops.metrics_text())
        .await
        .context("metrics_text")?;
    let body = if method == "HEAD" {
        &[][..]
    } else {
        text.as_bytes()
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    })
    .await??;
    Ok(())
}

async fn respond(stream: &mut TcpStream, status: &str, extra: &str, body: &[u8]) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n{extra}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    })
    .await??;
    Ok(())
}
