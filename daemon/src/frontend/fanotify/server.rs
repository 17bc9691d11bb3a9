//! The server side of the fanotify frontend: takes the misses the holder forwards,
//! makes their ranges present through the core, answers the kernel, and tells the
//! holder which events are done.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::holder::{
    ANSWER_MSG_LEN, MSG_EVENT, MSG_PRESENT_READ, MSG_STOP, encode_answer, recv_message,
};
use super::sys;
use crate::core::{Core, Priority};

/// Serves forwarded events until the holder asks to stop (then `stop` is notified) or
/// goes away.
pub async fn serve(
    core: Arc<Core>,
    group: Arc<OwnedFd>,
    socket: OwnedFd,
    stop: Arc<Notify>,
) -> io::Result<()> {
    // SAFETY: the OwnedFd moves into the AsyncFd, stays open and is the same
    // descriptor for the AsyncFd's whole life.
    let socket =
        unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE | Interest::WRITABLE) }
            .map_err(|e| e.into_parts().1)?;
    let socket = Arc::new(socket);
    loop {
        let Some((fd, kind, offset, count)) = recv_message(&socket).await? else {
            stop.notify_waiters();
            return Ok(());
        };
        match kind {
            MSG_STOP => {
                stop.notify_waiters();
                return Ok(());
            }
            MSG_PRESENT_READ => core.note_present_read(offset, count),
            MSG_EVENT => {
                let core = core.clone();
                let group = group.clone();
                let socket = socket.clone();
                tokio::spawn(async move {
                    let response = match core.ensure_range(offset, count, Priority::OnDemand).await
                    {
                        Ok(()) => sys::FAN_ALLOW,
                        Err(e) => {
                            tracing::warn!(offset, count, error = %e, "read failed: answering EIO");
                            sys::deny_errno(libc::EIO)
                        }
                    };
                    if let Err(e) = sys::respond(group.as_fd(), fd, response) {
                        // ENOENT: a previous server already answered it before dying.
                        if e.raw_os_error() != Some(libc::ENOENT) {
                            tracing::warn!(fd, error = %e, "answering the kernel failed");
                        }
                    }
                    let msg = encode_answer(fd, response);
                    loop {
                        let Ok(mut g) = socket.writable().await else {
                            return;
                        };
                        // SAFETY: msg is valid for its length.
                        let n = unsafe {
                            libc::send(
                                socket.get_ref().as_raw_fd(),
                                msg.as_ptr().cast(),
                                ANSWER_MSG_LEN,
                                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                            )
                        };
                        if n >= 0 {
                            return;
                        }
                        if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                            g.clear_ready();
                            continue;
                        }
                        return;
                    }
                });
            }
            other => tracing::error!(kind = other, "unknown message from the holder"),
        }
    }
}
