//! Image formats of dedup-snapshotter.
