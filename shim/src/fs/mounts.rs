//! A snapshot → the mounts containerd (or a test) performs to see it, exactly as
//! containerd's overlay snapshotter returns them:
//!
//! | snapshot | mounts |
//! |---|---|
//! | active or view, no parent | `bind` of its own `fs`, options `rw`/`ro`, `rbind` |
//! | view, one parent | `bind` of the parent's `fs`, `ro`, `rbind` |
//! | view, several parents | `overlay`, `lowerdir=<parents' fs, nearest first>` |
//! | active with parents | `overlay`, `workdir=`, `upperdir=`, `lowerdir=` |
//!
//! `index=off` comes first in overlay options when the kernel's overlay module has
//! an `index` parameter (containerd does the same: an index would tie the upper
//! dir to one set of lower dirs).

use crate::metadata::{Kind, Snapshot};

use super::Layout;

/// One mount: `containerd.types.Mount` without a target (the snapshot's root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type: `bind` or `overlay`.
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Host facts that change the overlay options.
#[derive(Clone, Copy, Debug, Default)]
pub struct OverlayOptions {
    /// Add `index=off`.
    pub index_off: bool,
}

impl OverlayOptions {
    /// What this kernel wants.
    pub fn probe() -> OverlayOptions {
        OverlayOptions {
            index_off: std::path::Path::new("/sys/module/overlay/parameters/index").exists(),
        }
    }
}

fn path(p: std::path::PathBuf) -> String {
    // Layout roots are checked to be UTF-8 when the snapshotter opens.
    p.to_string_lossy().into_owned()
}

/// The mounts of an active or view snapshot. A parent that is a dedupd layer is
/// seen through its EROFS mount, any other through its own directory.
pub fn mounts(layout: &Layout, s: &Snapshot, opts: &OverlayOptions) -> Vec<Mount> {
    let dir = |id| match s.layer_mounts.get(&id) {
        Some(m) => m.clone(),
        None => path(layout.fs_dir(id)),
    };
    let bind = |id, ro: bool| Mount {
        fs_type: "bind".into(),
        source: dir(id),
        options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
    };
    if s.parent_ids.is_empty() {
        return vec![bind(s.id, s.kind == Kind::View)];
    }
    let mut options = Vec::new();
    if opts.index_off {
        options.push("index=off".to_string());
    }
    if s.kind == Kind::Active {
        options.push(format!("workdir={}", path(layout.work_dir(s.id))));
        options.push(format!("upperdir={}", path(layout.fs_dir(s.id))));
    } else if s.parent_ids.len() == 1 {
        return vec![bind(s.parent_ids[0], true)];
    }
    let lower: Vec<String> = s.parent_ids.iter().map(|&id| dir(id)).collect();
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount {
        fs_type: "overlay".into(),
        source: "overlay".into(),
        options,
    }]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn m(kind: Kind, parents: &[i64], index_off: bool) -> Vec<Mount> {
        let l = Layout::new(Path::new("/r"));
        let s = Snapshot {
            id: 9,
            kind,
            parent_ids: parents.to_vec(),
            layer_mounts: [(1, "/l/mnt/c1".to_string())].into_iter().collect(),
        };
        mounts(&l, &s, &OverlayOptions { index_off })
    }

    fn one(fs_type: &str, source: &str, options: &[&str]) -> Vec<Mount> {
        vec![Mount {
            fs_type: fs_type.into(),
            source: source.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }]
    }

    #[test]
    fn like_containerd_overlay() {
        assert_eq!(
            m(Kind::Active, &[], true),
            one("bind", "/r/snapshots/9/fs", &["rw", "rbind"])
        );
        assert_eq!(
            m(Kind::View, &[], true),
            one("bind", "/r/snapshots/9/fs", &["ro", "rbind"])
        );
        assert_eq!(
            m(Kind::View, &[3], true),
            one("bind", "/r/snapshots/3/fs", &["ro", "rbind"])
        );
        assert_eq!(
            m(Kind::View, &[1], true),
            one("bind", "/l/mnt/c1", &["ro", "rbind"])
        );
        assert_eq!(
            m(Kind::View, &[3, 1], false),
            one(
                "overlay",
                "overlay",
                &["lowerdir=/r/snapshots/3/fs:/l/mnt/c1"]
            )
        );
        assert_eq!(
            m(Kind::Active, &[3, 1], true),
            one(
                "overlay",
                "overlay",
                &[
                    "index=off",
                    "workdir=/r/snapshots/9/work",
                    "upperdir=/r/snapshots/9/fs",
                    "lowerdir=/r/snapshots/3/fs:/l/mnt/c1"
                ]
            )
        );
    }
}
