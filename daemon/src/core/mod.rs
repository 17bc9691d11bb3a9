//! The core both kernel frontends call: "make this range of the store present".
//! `bitmap` says what is present (shared with the fanotify holder), `gate` orders
//! fetches by priority, `fill` fetches, verifies and writes chunks, `metrics` counts.

pub mod bitmap;
pub mod fill;
pub mod gate;
pub mod metrics;

pub use bitmap::SharedBitmap;
pub use fill::{Core, CoreOptions, FillError, LayerSource, SLOT_STRIDE, SlotWriter};
pub use gate::Priority;
