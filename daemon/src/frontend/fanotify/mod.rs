//! fanotify pre-content frontend (Linux 6.14+): the store file is marked FAN_PRE_ACCESS,
//! every read of it by an EROFS mount becomes an event, and nothing is read until the
//! range is present. `sys` is the ABI, `holder` keeps the group alive and answers the
//! fast path, `server` fills misses through the core.

pub mod holder;
pub mod server;
pub mod sys;
