//! Which committed snapshots are EROFS layers held from dedupd, and where those
//! layers are mounted.
//!
//! A committed snapshot whose row has a layer is seen through the layer's mount
//! (`lowerdir=` of its children, the source of a read-only bind) instead of its own
//! directory, which is empty. The row goes with the snapshot (`ON DELETE CASCADE`);
//! the snapshotter reads it before removing so it can release the layer.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{OptionalExtension, params};

use super::{Error, Id, Kind, Tx, now, to_ns};
use crate::metadata::validate::{validate_key, validate_labels};

/// How a layer came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A converted layer, fetched lazily from its registry.
    Remote,
    /// A directory containerd unpacked into, turned into chunks at commit.
    Imported,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Remote => "remote",
            Origin::Imported => "imported",
        }
    }

    fn parse(s: &str) -> Result<Origin, Error> {
        match s {
            "remote" => Ok(Origin::Remote),
            "imported" => Ok(Origin::Imported),
            other => Err(Error::Corrupt(format!("layer origin {other:?}"))),
        }
    }
}

/// A snapshot's layer as dedupd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRef {
    /// dedupd's chain id of the layer (`sha256:<hex>`).
    pub chain_id: String,
    /// The layer's read-only EROFS mount.
    pub mountpoint: String,
    pub origin: Origin,
}

pub(super) const SCHEMA_V2: &str = "
CREATE TABLE layers (
    snapshot_id INTEGER PRIMARY KEY REFERENCES snapshots(id) ON DELETE CASCADE,
    chain_id    TEXT NOT NULL,
    mountpoint  TEXT NOT NULL,
    origin      TEXT NOT NULL CHECK (origin IN ('remote', 'imported'))
);
";

impl Tx<'_> {
    /// Records that committed snapshot `id` is `layer`.
    pub fn set_layer(&self, id: Id, layer: &LayerRef) -> Result<(), Error> {
        self.tx
            .execute(
                "INSERT OR REPLACE INTO layers (snapshot_id, chain_id, mountpoint, origin)
                 VALUES (?1, ?2, ?3, ?4)",
                params![id, layer.chain_id, layer.mountpoint, layer.origin.as_str()],
            )
            .map_err(Error::db("recording a layer"))?;
        Ok(())
    }

    /// The layer of snapshot `id`, if it is one.
    pub fn layer(&self, id: Id) -> Result<Option<LayerRef>, Error> {
        self.tx
            .query_row(
                "SELECT chain_id, mountpoint, origin FROM layers WHERE snapshot_id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(Error::db("reading a layer"))?
            .map(|(chain_id, mountpoint, origin)| {
                Ok(LayerRef {
                    chain_id,
                    mountpoint,
                    origin: Origin::parse(&origin)?,
                })
            })
            .transpose()
    }

    /// The layer mounts of `ids` that are layers.
    pub fn layer_mounts(&self, ids: &[Id]) -> Result<HashMap<Id, String>, Error> {
        let mut out = HashMap::new();
        for &id in ids {
            if let Some(l) = self.layer(id)? {
                out.insert(id, l.mountpoint);
            }
        }
        Ok(out)
    }

    /// Every layer, by snapshot id.
    pub fn all_layers(&self) -> Result<Vec<(Id, LayerRef)>, Error> {
        let mut stmt = self
            .tx
            .prepare("SELECT snapshot_id FROM layers ORDER BY snapshot_id")
            .map_err(Error::db("listing layers"))?;
        let ids: Vec<Id> = stmt
            .query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(Error::db("listing layers"))?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(l) = self.layer(id)? {
                out.push((id, l));
            }
        }
        Ok(out)
    }

    /// Creates committed snapshot `name` on `parent` directly (a remote snapshot:
    /// nothing was ever unpacked into it). Same checks as Prepare, plus the name
    /// must be free.
    pub fn create_committed(
        &self,
        name: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Id, Error> {
        validate_key("name", name)?;
        validate_labels(labels)?;
        let parent_id = if parent.is_empty() {
            None
        } else {
            let row = self
                .row(parent)?
                .ok_or_else(|| Error::NotFound(format!("parent snapshot {parent:?}")))?;
            if row.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {parent:?} is not a committed snapshot"
                )));
            }
            Some(row.id)
        };
        if self.row(name)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        let t = to_ns(now());
        self.tx
            .execute(
                "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns)
                 VALUES (?1, ?2, ?3, ?4, ?4)",
                params![name, parent_id, Kind::Committed as i64, t],
            )
            .map_err(Error::db("inserting a snapshot"))?;
        let id = self.tx.last_insert_rowid();
        self.put_labels(id, labels)?;
        Ok(id)
    }
}
