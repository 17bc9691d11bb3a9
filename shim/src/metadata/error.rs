//! Errors of the metadata store. The first four are containerd's error classes
//! (errdefs): the service sends them as the matching gRPC codes and containerd maps
//! them back, so a caller can tell "no such snapshot" from "already there".

/// What went wrong, with the input it went wrong on. Messages end like containerd's
/// (`snapshot "k": not found`), which is what `ctr` shows.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No snapshot (or parent) with that key.
    #[error("{0}: not found")]
    NotFound(String),
    /// A snapshot with that key already exists.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The request is valid but the snapshot is in the wrong state (committing a
    /// view, removing a parent, mounting a committed snapshot).
    #[error("{0}: failed precondition")]
    FailedPrecondition(String),
    /// A bad key, label, field path or filter.
    #[error("{0}: invalid argument")]
    InvalidArgument(String),
    /// SQLite failed.
    #[error("metadata database: {op}: {source}")]
    Db {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// The database holds something this code never writes.
    #[error("metadata database is inconsistent: {0}")]
    Corrupt(String),
}

impl Error {
    pub(crate) fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
        move |source| Error::Db { op, source }
    }
}
