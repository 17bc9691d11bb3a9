//! The core both kernel frontends call: "make this range of the store present".
//! `bitmap` says what is present (shared with the fanotify holder), `gate` orders
//! fetches by priority, `fill` fetches, verifies and writes chunks, `locality` says
//! which chunks a miss makes likely next, `metrics` counts.

pub mod bitmap;
pub mod fill;
pub mod gate;
pub mod locality;
pub mod metrics;

pub use bitmap::SharedBitmap;
pub use fill::{
    Access, AccessKind, Core, CoreOptions, FillError, LayerSource, LocalityOptions, SLOT_STRIDE,
    SlotWriter,
};
pub use gate::Priority;
