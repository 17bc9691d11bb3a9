//! The mounts themselves, with mount(2) directly (never util-linux `mount`, which would
//! put a file-backed EROFS image on a loop device and so bypass fanotify), and
//! `/proc/self/mountinfo` to see what is mounted.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags};

/// The kernel copies at most one page of mount data, NUL included.
pub const MOUNT_DATA_MAX: usize = 4095;

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`.
pub fn mountinfo() -> Result<Vec<MountInfo>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < sep + 3 || sep < 5 {
            continue;
        }
        out.push(MountInfo {
            id: fields[0].parse().unwrap_or(0),
            mountpoint: PathBuf::from(unescape(fields[4])),
            fstype: fields[sep + 1].to_string(),
            source: unescape(fields[sep + 2]),
            super_options: fields
                .get(sep + 3)
                .map(|s| s.to_string())
                .unwrap_or_default(),
        });
    }
    out
}

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mounted_at(path: &Path) -> Result<Option<MountInfo>> {
    Ok(mountinfo()?
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path))
}

/// Mounts the EROFS metadata image `metadata` read-only at `target`, file-backed, with
/// the store file as its extra device.
pub fn mount_erofs(metadata: &Path, store: &Path, target: &Path) -> Result<()> {
    let data = format!("device={}", mount_path(store)?);
    nix::mount::mount(
        Some(metadata),
        target,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .with_context(|| {
        format!(
            "mount(2) erofs {} on {} with {data}",
            metadata.display(),
            target.display()
        )
    })
}

/// A path as it may appear in mount data: no separators overlayfs or the option
/// parser would split on.
fn mount_path(p: &Path) -> Result<&str> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))?;
    if s.contains([',', ':', '\\', '\n', ' ', '\t']) {
        bail!("{s}: paths used in mount options may not contain ',', ':', '\\' or whitespace");
    }
    Ok(s)
}

/// The overlay mount data for read-only lower layers, topmost first.
pub fn overlay_data(lowers_top_first: &[PathBuf]) -> Result<String> {
    let mut data = String::from("lowerdir=");
    for (i, l) in lowers_top_first.iter().enumerate() {
        if i > 0 {
            data.push(':');
        }
        data.push_str(mount_path(l)?);
    }
    if data.len() > MOUNT_DATA_MAX {
        bail!(
            "the overlay mount data for {} layers is {} bytes, more than the kernel's {} \
             (use a shorter --root)",
            lowers_top_first.len(),
            data.len(),
            MOUNT_DATA_MAX
        );
    }
    Ok(data)
}

/// A read-only overlay of `lowers_top_first` at `target`.
pub fn mount_overlay(lowers_top_first: &[PathBuf], target: &Path) -> Result<()> {
    let data = overlay_data(lowers_top_first)?;
    nix::mount::mount(
        Some("dedup-overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .with_context(|| format!("mount(2) overlay on {} with {data}", target.display()))
}

/// A read-only bind mount of `source` at `target`.
pub fn mount_bind_ro(source: &Path, target: &Path) -> Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("bind mount {} on {}", source.display(), target.display()))?;
    let ro = nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .with_context(|| format!("remounting {} read-only", target.display()));
    if ro.is_err() {
        let _ = nix::mount::umount2(target, MntFlags::empty());
    }
    ro
}

/// Unmounts `target`; a busy mount is an error that says so.
pub fn unmount(target: &Path) -> Result<()> {
    match nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => bail!(
            "{} is busy (a process uses files or a mount below it); not unmounted",
            target.display()
        ),
        Err(e) => Err(e).with_context(|| format!("umount2 {}", target.display())),
    }
}

/// Detaches `target` lazily (MNT_DETACH): for cleanup paths that must not leave a
/// mount behind even when it is busy.
pub fn detach(target: &Path) -> Result<()> {
    nix::mount::umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
        .with_context(|| format!("umount2 MNT_DETACH {}", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines_with_escapes_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:50 / /var/lib/x/mnt/ab ro,relatime - erofs /var/lib/x/layers/ab.erofs ro,device=/s\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[1].source, "/var/lib/x/layers/ab.erofs");
        assert_eq!(m[1].super_options, "ro,device=/s");
    }

    #[test]
    fn overlay_data_is_bounded() {
        let l: Vec<PathBuf> = (0..3)
            .map(|i| PathBuf::from(format!("/r/mnt/{i}")))
            .collect();
        assert_eq!(
            overlay_data(&l).unwrap(),
            "lowerdir=/r/mnt/0:/r/mnt/1:/r/mnt/2"
        );
        let long: Vec<PathBuf> = (0..60)
            .map(|i| PathBuf::from(format!("/var/lib/dedup-snapshotter/mnt/{i:064}")))
            .collect();
        let e = overlay_data(&long).unwrap_err().to_string();
        assert!(e.contains("more than the kernel's 4095"), "{e}");
        assert!(overlay_data(&[PathBuf::from("/a:b")]).is_err());
    }
}
