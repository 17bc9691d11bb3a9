//! Access traces: which chunks an image's workload reads first, in order, so a later
//! start can fetch them ahead of the reads (design, data flow step 6).
//!
//! `format` is the file format (`FORMAT.md`), `recorder` records traces from the
//! core's on-demand misses, `replay` fetches a trace's chunks at prefetch priority.

pub mod format;
pub mod recorder;
pub mod registry;
pub mod replay;

pub use format::{Trace, merge};
pub use recorder::{Recorder, RecorderOptions};
