//! Client side of dedupd's control API (for dedupctl and the shim): connect over the
//! unix socket, and turn replies into text.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
pub use dedup_proto::daemon as proto;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

pub use proto::daemon_client::DaemonClient;

/// Where dedupd listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/dedupd/dedupd.sock";
/// Environment variable that overrides [`DEFAULT_SOCKET`] for dedupctl.
pub const SOCKET_ENV: &str = "DEDUPD_SOCKET";

/// Largest reply accepted (traces and status lists can be large).
const MAX_REPLY: usize = 128 << 20;

/// Connect to dedupd's control socket.
///
/// Fails with a message saying what is wrong when the daemon is not running (no
/// socket file, or a stale one nothing listens on) or when the socket is not ours to
/// open (it is root's, mode 0600).
pub async fn connect(socket: &Path) -> Result<DaemonClient<Channel>> {
    let first = connect_stream(socket).await?;
    // Hand the stream we just opened to the channel; reconnects open new ones.
    let first = Arc::new(Mutex::new(Some(first)));
    let path: PathBuf = socket.to_path_buf();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        let first = first.lock().expect("not poisoned").take();
        async move {
            let stream = match first {
                Some(s) => s,
                None => UnixStream::connect(&path).await?,
            };
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    // The URI is a placeholder: the connector ignores it.
    let channel = Endpoint::from_static("http://dedupd.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to dedupd on {}", socket.display()))?;
    Ok(DaemonClient::new(channel).max_decoding_message_size(MAX_REPLY))
}

async fn connect_stream(socket: &Path) -> Result<UnixStream> {
    match UnixStream::connect(socket).await {
        Ok(s) => Ok(s),
        Err(e) => {
            let shown = socket.display();
            match e.kind() {
                io::ErrorKind::NotFound => {
                    bail!("is dedupd running? no socket at {shown}")
                }
                io::ErrorKind::ConnectionRefused => {
                    bail!("is dedupd running? nothing listens on {shown} (stale socket)")
                }
                io::ErrorKind::PermissionDenied => {
                    bail!("permission denied on {shown}: the control socket is only for root")
                }
                _ => Err(e).with_context(|| format!("connecting to {shown}")),
            }
        }
    }
}

/// Whether `socket` exists and something answers on it.
pub fn daemon_answers(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// An error from a control RPC as one line: "<what>: <message> (<code>)", instead
/// of tonic's debug-style Display.
pub fn rpc_error(what: &str, status: tonic::Status) -> anyhow::Error {
    let msg = status.message();
    let code = status.code();
    // The daemon drops connections from peers that are neither root nor its own user
    // before any gRPC exchange; depending on timing the client sees that as a failed
    // connect or as a cancelled call.
    if matches!(code, tonic::Code::Cancelled | tonic::Code::Unavailable) {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return anyhow::anyhow!(
                "{what}: connecting to dedupd on the control socket failed ({msg}): the control socket is only for root"
            );
        }
    }
    if msg.is_empty() {
        anyhow::anyhow!("{what}: {}", code.description())
    } else {
        anyhow::anyhow!("{what}: {msg} ({code:?})")
    }
}

/// AcquireLayer: hold one layer of a converted image as a lazy EROFS mount. The status
/// is returned as is, so callers can map its code (InvalidArgument: a malformed field
/// or a chain id, diff_id or index that do not agree; FailedPrecondition: the parent is
/// not held; NotFound: the index is not in the repository).
pub async fn acquire_layer(
    c: &mut DaemonClient<Channel>,
    req: proto::AcquireLayerRequest,
) -> Result<proto::LayerMount, tonic::Status> {
    Ok(c.acquire_layer(req).await?.into_inner())
}

/// ImportLayer: turn an unpacked layer directory into store chunks and an EROFS layer
/// mount held by the request's owner (codes as for [`acquire_layer`]).
pub async fn import_layer(
    c: &mut DaemonClient<Channel>,
    req: proto::ImportLayerRequest,
) -> Result<proto::LayerMount, tonic::Status> {
    Ok(c.import_layer(req).await?.into_inner())
}

/// ReleaseLayer: drop `owner`'s hold on layer `chain_id` (`sha256:<hex>`). True when
/// the layer mount went with it. NotFound: the chain is not held, or not by `owner`.
pub async fn release_layer(
    c: &mut DaemonClient<Channel>,
    chain_id: &str,
    owner: &str,
) -> Result<bool, tonic::Status> {
    Ok(c.release_layer(proto::ReleaseLayerRequest {
        chain_id: chain_id.to_string(),
        owner: owner.to_string(),
    })
    .await?
    .into_inner()
    .unmounted)
}

/// What dedupctl prints for a held layer.
pub fn format_layer_mount(m: &proto::LayerMount) -> String {
    let mut out = format!("layer {} mounted on {}\n", m.chain_id, m.mountpoint);
    if let Some(l) = &m.layer {
        out.push_str(&format!(
            "  index {} ({} chunks, {})\n",
            l.index_digest,
            l.chunks,
            human_bytes(l.chunk_bytes)
        ));
    }
    if m.index_bytes_fetched > 0 {
        out.push_str(&format!(
            "  {} of layer index fetched\n",
            human_bytes(m.index_bytes_fetched)
        ));
    }
    if m.new_chunks > 0 || m.new_bytes > 0 || m.index_bytes_fetched == 0 {
        out.push_str(&format!(
            "  {} new chunks, {} new to the store\n",
            m.new_chunks,
            human_bytes(m.new_bytes)
        ));
    }
    out
}

/// Bytes as B, KiB, MiB, GiB, TiB.
pub fn human_bytes(n: u64) -> String {
    dedup_image::convert::image::human(n)
}

/// Lines describing an image.
pub fn format_image(img: &proto::ImageInfo) -> String {
    let mut out = format!(
        "{} ({}), {} layers, {}\n",
        img.reference,
        if img.manifest_digest.is_empty() {
            img.image_id.as_str()
        } else {
            img.manifest_digest.as_str()
        },
        img.layers.len(),
        human_bytes(img.total_bytes)
    );
    for l in &img.layers {
        out.push_str(&format!(
            "  {} {} chunks, {}\n",
            l.index_digest,
            l.chunks,
            human_bytes(l.chunk_bytes)
        ));
    }
    out
}

/// What `dedupctl mount` prints.
pub fn format_mount(target: &Path, m: &proto::MountResponse) -> String {
    let mut out = String::new();
    if let Some(img) = &m.image {
        out.push_str(&format_image(img));
    }
    out.push_str(&format!(
        "mounted on {} ({} layer mounts, {} of layer indexes fetched)\n",
        target.display(),
        m.layer_mounts.len(),
        human_bytes(m.index_bytes_fetched)
    ));
    out
}

/// What `dedupctl status` prints.
pub fn format_status(s: &proto::StatusResponse) -> String {
    let mut out = format!(
        "dedupd pid {}, mode {}, up {}s\n",
        s.pid,
        if s.mode.is_empty() { "-" } else { &s.mode },
        s.uptime_seconds
    );
    if let Some(st) = &s.store {
        out.push_str(&format!(
            "store: {} chunks, {} of chunk data, {} allocated, {} free on the filesystem\n",
            st.chunks,
            human_bytes(st.chunk_bytes),
            human_bytes(st.allocated_bytes),
            human_bytes(st.fs_free)
        ));
    }
    out.push_str(&format!("images: {}\n", s.images.len()));
    for img in &s.images {
        for line in format_image(img).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!("mounts: {}\n", s.mounts.len()));
    for m in &s.mounts {
        out.push_str(&format!("  {} {}\n", m.target, m.reference));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn status_text() {
        let s = proto::StatusResponse {
            mode: "fanotify".into(),
            pid: 7,
            uptime_seconds: 9,
            images: vec![proto::ImageInfo {
                reference: "r/a:1".into(),
                manifest_digest: "sha256:ab".into(),
                ..Default::default()
            }],
            mounts: vec![proto::MountEntry {
                target: "/mnt/a".into(),
                reference: "r/a:1".into(),
            }],
            store: Some(proto::StoreStatus::default()),
        };
        let t = format_status(&s);
        assert!(t.contains("pid 7, mode fanotify"), "{t}");
        assert!(t.contains("  /mnt/a r/a:1"), "{t}");
        assert!(t.contains("r/a:1 (sha256:ab), 0 layers"), "{t}");
    }

    #[tokio::test]
    async fn no_socket_message() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect(&dir.path().join("none.sock")).await.unwrap_err();
        assert!(format!("{err:#}").contains("is dedupd running? no socket at"));
        // A stale socket: bound once, listener gone.
        let p = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        let err = connect(&p).await.unwrap_err();
        assert!(format!("{err:#}").contains("nothing listens"), "{err:#}");
    }
}
