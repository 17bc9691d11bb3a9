//! The snapshot metadata store: keys, kinds, parents, labels, timestamps and the
//! usage recorded at commit, in one SQLite database (`<root>/metadata.db`, WAL,
//! `synchronous=FULL`). It knows nothing about directories or mounts.
//!
//! Every operation is one transaction ([`MetaStore::read`] / [`MetaStore::write`]):
//! a crash leaves the database as it was before or after the operation, never in
//! between. The snapshotter may do filesystem work inside a write transaction (as
//! containerd's overlay snapshotter does inside its bolt transaction): the work is
//! ordered so that a crash can only leave a directory no row refers to, which
//! Cleanup removes.
//!
//! Semantics are containerd's `snapshots/storage` (the metastore every built-in
//! snapshotter uses), errors included:
//!
//! | operation | errors |
//! |---|---|
//! | create (Prepare, View) | parent missing: NotFound; parent not committed: InvalidArgument; key taken: AlreadyExists |
//! | commit | name taken: AlreadyExists; key missing: NotFound; not active: FailedPrecondition |
//! | remove | missing: NotFound; has children: FailedPrecondition |
//! | get_snapshot (Mounts) | missing: NotFound; committed: FailedPrecondition |
//! | update | missing: NotFound; a field path other than `labels`, `labels.<k>`: InvalidArgument |
//!
//! Ids come from `AUTOINCREMENT` and are never reused once committed, so a
//! directory named by an id can never be mistaken for a later snapshot's.

mod error;
mod filter;
mod layers;
mod validate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

pub use error::Error;
pub use filter::Filter;
pub use layers::{LayerRef, Origin};
pub use validate::{MAX_KEY_BYTES, MAX_LABEL_BYTES, validate_key, validate_labels};

/// A snapshot's numeric id; its directory is named by it.
pub type Id = i64;

/// The kind of a snapshot; the numbers are containerd's (`snapshots.Kind`, and
/// the `Kind` enum of the snapshots API).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    View = 1,
    Active = 2,
    Committed = 3,
}

impl Kind {
    fn from_db(v: i64) -> Result<Kind, Error> {
        match v {
            1 => Ok(Kind::View),
            2 => Ok(Kind::Active),
            3 => Ok(Kind::Committed),
            other => Err(Error::Corrupt(format!("snapshot kind {other}"))),
        }
    }
}

/// What containerd sees of a snapshot (Stat, List, Update).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// The parent's name; empty for none.
    pub parent: String,
    pub kind: Kind,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub labels: BTreeMap<String, String>,
}

/// Disk usage of a snapshot's own directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes allocated (st_blocks × 512, each inode counted once).
    pub size: i64,
    pub inodes: i64,
}

/// An active or view snapshot, as mounting needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: Id,
    pub kind: Kind,
    /// The parent chain, nearest parent first.
    pub parent_ids: Vec<Id>,
    /// The EROFS layer mounts of those parents that are dedupd layers.
    pub layer_mounts: HashMap<Id, String>,
}

const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT    NOT NULL UNIQUE,
    parent_id   INTEGER REFERENCES snapshots(id),
    kind        INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    -- usage measured at commit (committed snapshots only)
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX snapshots_parent ON snapshots(parent_id);
CREATE TABLE labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key         TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    PRIMARY KEY (snapshot_id, key)
) WITHOUT ROWID;
";

/// The metadata database. One connection behind a mutex: operations are short and
/// serialized, which also orders the filesystem work done inside them.
pub struct MetaStore {
    conn: Mutex<Connection>,
}

impl MetaStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<MetaStore, Error> {
        let conn = Connection::open(path).map_err(Error::db("open"))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(Error::db("busy_timeout"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(Error::db("journal_mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Corrupt(format!(
                "{} cannot use WAL (journal mode {mode})",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(Error::db("pragmas"))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(Error::db("user_version"))?;
        match version {
            0 => {
                conn.execute_batch(&format!(
                    "BEGIN IMMEDIATE; {SCHEMA} {} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;",
                    layers::SCHEMA_V2
                ))
                .map_err(Error::db("creating the schema"))?;
            }
            1 => {
                conn.execute_batch(&format!(
                    "BEGIN IMMEDIATE; {} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;",
                    layers::SCHEMA_V2
                ))
                .map_err(Error::db("upgrading the schema to version 2"))?;
            }
            SCHEMA_VERSION => {}
            v => {
                return Err(Error::Corrupt(format!(
                    "{} has schema version {v}; this build knows {SCHEMA_VERSION} (written by a newer dedup-snapshotter?)",
                    path.display()
                )));
            }
        }
        Ok(MetaStore {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic inside a transaction rolled it back when the transaction dropped;
        // the connection itself is fine.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` in a read transaction.
    pub fn read<T, E: From<Error>>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, E>) -> Result<T, E> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(Error::db("begin"))?;
        f(&Tx { tx })
    }

    /// Runs `f` in a write transaction, committed if `f` succeeds and rolled back
    /// otherwise. No other operation runs meanwhile.
    pub fn write<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(Error::db("begin"))?;
        let t = Tx { tx };
        let out = f(&t)?;
        t.tx.commit().map_err(Error::db("commit"))?;
        Ok(out)
    }
}

/// A transaction: the operations of containerd's metastore.
pub struct Tx<'c> {
    tx: rusqlite::Transaction<'c>,
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn to_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

fn from_ns(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

struct Row {
    id: Id,
    kind: Kind,
    parent_id: Option<Id>,
}

impl Tx<'_> {
    fn row(&self, key: &str) -> Result<Option<Row>, Error> {
        self.tx
            .query_row(
                "SELECT id, kind, parent_id FROM snapshots WHERE key = ?1",
                [key],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(Error::db("looking up a snapshot"))?
            .map(|(id, kind, parent_id)| {
                Ok(Row {
                    id,
                    kind: Kind::from_db(kind)?,
                    parent_id,
                })
            })
            .transpose()
    }

    /// The id and kind of `key`, if it exists.
    pub fn lookup(&self, key: &str) -> Result<Option<(Id, Kind)>, Error> {
        Ok(self.row(key)?.map(|r| (r.id, r.kind)))
    }

    /// The chain from `id` up to the root, `id` first.
    fn chain(&self, id: Id) -> Result<Vec<Id>, Error> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "WITH RECURSIVE chain(id, parent_id, depth) AS (
                     SELECT id, parent_id, 0 FROM snapshots WHERE id = ?1
                     UNION ALL
                     SELECT s.id, s.parent_id, c.depth + 1
                       FROM snapshots s JOIN chain c ON s.id = c.parent_id
                      WHERE c.depth < 100000
                 )
                 SELECT id FROM chain ORDER BY depth",
            )
            .map_err(Error::db("parent chain"))?;
        let ids = stmt
            .query_map([id], |r| r.get(0))
            .and_then(|rows| rows.collect::<Result<Vec<Id>, _>>())
            .map_err(Error::db("parent chain"))?;
        if ids.len() > 100_000 {
            return Err(Error::Corrupt(format!(
                "the parent chain of snapshot {id} loops"
            )));
        }
        Ok(ids)
    }

    fn labels_of(&self, id: Id) -> Result<BTreeMap<String, String>, Error> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT key, value FROM labels WHERE snapshot_id = ?1")
            .map_err(Error::db("reading labels"))?;
        stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(Error::db("reading labels"))
    }

    /// Replaces the labels of `id`; empty values are not stored (containerd drops
    /// them too, which is how a field-masked update removes a label).
    fn put_labels(&self, id: Id, labels: &BTreeMap<String, String>) -> Result<(), Error> {
        self.tx
            .execute("DELETE FROM labels WHERE snapshot_id = ?1", [id])
            .map_err(Error::db("writing labels"))?;
        let mut stmt = self
            .tx
            .prepare_cached("INSERT INTO labels (snapshot_id, key, value) VALUES (?1, ?2, ?3)")
            .map_err(Error::db("writing labels"))?;
        for (k, v) in labels.iter().filter(|(_, v)| !v.is_empty()) {
            stmt.execute(params![id, k, v])
                .map_err(Error::db("writing labels"))?;
        }
        Ok(())
    }

    /// Creates an active or view snapshot on `parent` (empty: none).
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Snapshot, Error> {
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "snapshot {key:?}: only active and view snapshots can be created"
            )));
        }
        validate_key("key", key)?;
        validate_labels(labels)?;
        let parent_row = if parent.is_empty() {
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
            Some(row)
        };
        if self.row(key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
        }
        let t = to_ns(now());
        self.tx
            .execute(
                "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns)
                 VALUES (?1, ?2, ?3, ?4, ?4)",
                params![key, parent_row.as_ref().map(|r| r.id), kind as i64, t],
            )
            .map_err(Error::db("inserting a snapshot"))?;
        let id = self.tx.last_insert_rowid();
        self.put_labels(id, labels)?;
        let parent_ids = match &parent_row {
            Some(p) => self.chain(p.id)?,
            None => vec![],
        };
        let layer_mounts = self.layer_mounts(&parent_ids)?;
        Ok(Snapshot {
            id,
            kind,
            parent_ids,
            layer_mounts,
        })
    }

    /// An active or view snapshot with its parent chain (for Mounts).
    pub fn get_snapshot(&self, key: &str) -> Result<Snapshot, Error> {
        let row = self
            .row(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
        if row.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed, not active or view"
            )));
        }
        let parent_ids = match row.parent_id {
            Some(p) => self.chain(p)?,
            None => vec![],
        };
        let layer_mounts = self.layer_mounts(&parent_ids)?;
        Ok(Snapshot {
            id: row.id,
            kind: row.kind,
            parent_ids,
            layer_mounts,
        })
    }

    /// Id, info and recorded usage of any snapshot.
    pub fn get_info(&self, key: &str) -> Result<(Id, Info, Usage), Error> {
        let found = self
            .tx
            .query_row(
                "SELECT s.id, s.kind, COALESCE(p.key, ''), s.created_ns, s.updated_ns,
                        s.size, s.inodes
                   FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
                  WHERE s.key = ?1",
                [key],
                |r| {
                    Ok((
                        r.get::<_, Id>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                    ))
                },
            )
            .optional()
            .map_err(Error::db("reading a snapshot"))?;
        let (id, kind, parent, created, updated, size, inodes) =
            found.ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
        let info = Info {
            name: key.to_string(),
            parent,
            kind: Kind::from_db(kind)?,
            created: from_ns(created),
            updated: from_ns(updated),
            labels: self.labels_of(id)?,
        };
        Ok((id, info, Usage { size, inodes }))
    }

    /// Updates the labels of `name` (containerd's UpdateInfo): with no field paths
    /// all labels are replaced by `labels`; `labels` replaces them all;
    /// `labels.<key>` sets (or, with no value in `labels`, removes) one label. Any
    /// other path is InvalidArgument. Bumps the update time.
    pub fn update(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        field_paths: &[String],
    ) -> Result<Info, Error> {
        let (id, mut info, _) = self.get_info(name)?;
        if field_paths.is_empty() {
            info.labels = labels.clone();
        } else {
            for path in field_paths {
                if let Some(k) = path.strip_prefix("labels.") {
                    info.labels
                        .insert(k.to_string(), labels.get(k).cloned().unwrap_or_default());
                } else if path == "labels" {
                    info.labels = labels.clone();
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field {path:?} of snapshot {name:?}"
                    )));
                }
            }
        }
        info.labels.retain(|_, v| !v.is_empty());
        validate_labels(&info.labels)?;
        let t = now();
        self.tx
            .execute(
                "UPDATE snapshots SET updated_ns = ?2 WHERE id = ?1",
                params![id, to_ns(t)],
            )
            .map_err(Error::db("updating a snapshot"))?;
        self.put_labels(id, &info.labels)?;
        info.updated = from_ns(to_ns(t));
        Ok(info)
    }

    /// Turns the active snapshot `key` into the committed snapshot `name` (same
    /// id, same parent; labels replaced by `labels`, not inherited; created and
    /// updated set to now), recording `usage`.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        usage: Usage,
        labels: &BTreeMap<String, String>,
    ) -> Result<Id, Error> {
        validate_key("name", name)?;
        validate_labels(labels)?;
        if self.row(name)?.is_some() {
            return Err(Error::AlreadyExists(format!("committed snapshot {name:?}")));
        }
        let row = self
            .row(key)?
            .ok_or_else(|| Error::NotFound(format!("active snapshot {key:?}")))?;
        if row.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        let t = to_ns(now());
        self.tx
            .execute(
                "UPDATE snapshots SET key = ?2, kind = ?3, created_ns = ?4, updated_ns = ?4,
                        size = ?5, inodes = ?6
                  WHERE id = ?1",
                params![
                    row.id,
                    name,
                    Kind::Committed as i64,
                    t,
                    usage.size,
                    usage.inodes
                ],
            )
            .map_err(Error::db("committing a snapshot"))?;
        self.put_labels(row.id, labels)?;
        Ok(row.id)
    }

    /// Removes `key`; refused while it has children.
    pub fn remove(&self, key: &str) -> Result<(Id, Kind), Error> {
        let row = self
            .row(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?}")))?;
        let child: Option<String> = self
            .tx
            .query_row(
                "SELECT key FROM snapshots WHERE parent_id = ?1 LIMIT 1",
                [row.id],
                |r| r.get(0),
            )
            .optional()
            .map_err(Error::db("looking for children"))?;
        if let Some(child) = child {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?} with child {child:?}"
            )));
        }
        self.tx
            .execute("DELETE FROM snapshots WHERE id = ?1", [row.id])
            .map_err(Error::db("removing a snapshot"))?;
        Ok((row.id, row.kind))
    }

    /// Every snapshot that matches `filter`, ordered by name.
    pub fn walk(&self, filter: &Filter) -> Result<Vec<Info>, Error> {
        let mut labels: HashMap<Id, BTreeMap<String, String>> = HashMap::new();
        {
            let mut stmt = self
                .tx
                .prepare("SELECT snapshot_id, key, value FROM labels")
                .map_err(Error::db("listing labels"))?;
            let mut rows = stmt.query([]).map_err(Error::db("listing labels"))?;
            while let Some(r) = rows.next().map_err(Error::db("listing labels"))? {
                let id: Id = r.get(0).map_err(Error::db("listing labels"))?;
                let k: String = r.get(1).map_err(Error::db("listing labels"))?;
                let v: String = r.get(2).map_err(Error::db("listing labels"))?;
                labels.entry(id).or_default().insert(k, v);
            }
        }
        let mut stmt = self
            .tx
            .prepare(
                "SELECT s.id, s.key, s.kind, COALESCE(p.key, ''), s.created_ns, s.updated_ns
                   FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
                  ORDER BY s.key",
            )
            .map_err(Error::db("listing snapshots"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Id>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(Error::db("listing snapshots"))?;
        let mut out = Vec::new();
        for (id, name, kind, parent, created, updated) in rows {
            let info = Info {
                name,
                parent,
                kind: Kind::from_db(kind)?,
                created: from_ns(created),
                updated: from_ns(updated),
                labels: labels.remove(&id).unwrap_or_default(),
            };
            if filter.matches(&info) {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Every id in use.
    pub fn ids(&self) -> Result<HashSet<Id>, Error> {
        let mut stmt = self
            .tx
            .prepare("SELECT id FROM snapshots")
            .map_err(Error::db("listing ids"))?;
        stmt.query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(Error::db("listing ids"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(&d.path().join("metadata.db")).unwrap();
        (d, s)
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn create(s: &MetaStore, kind: Kind, key: &str, parent: &str) -> Result<Snapshot, Error> {
        s.write(|tx| tx.create(kind, key, parent, &BTreeMap::new()))
    }

    fn commit(s: &MetaStore, key: &str, name: &str) -> Result<Id, Error> {
        s.write(|tx| tx.commit(key, name, Usage::default(), &BTreeMap::new()))
    }

    #[test]
    fn chain_and_errors() {
        let (_d, s) = store();
        let a = create(&s, Kind::Active, "a", "").unwrap();
        assert!(a.parent_ids.is_empty());
        commit(&s, "a", "A").unwrap();
        let b = create(&s, Kind::Active, "b", "A").unwrap();
        assert_eq!(b.parent_ids, vec![a.id]);
        commit(&s, "b", "B").unwrap();
        let c = create(&s, Kind::View, "c", "B").unwrap();
        assert_eq!(c.parent_ids, vec![b.id, a.id]);
        assert_eq!(s.read(|tx| tx.get_snapshot("c")).unwrap(), c);

        assert!(matches!(
            create(&s, Kind::Active, "c", "B"),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            create(&s, Kind::Active, "x", "nope"),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            create(&s, Kind::Active, "x", "c"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            commit(&s, "c", "C"),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(commit(&s, "nope", "C"), Err(Error::NotFound(_))));
        create(&s, Kind::Active, "d", "B").unwrap();
        assert!(matches!(commit(&s, "d", "A"), Err(Error::AlreadyExists(_))));
        // The name is checked first, as in containerd.
        assert!(matches!(
            commit(&s, "nope", "A"),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            s.read(|tx| tx.get_snapshot("A")),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.write(|tx| tx.remove("B")),
            Err(Error::FailedPrecondition(_))
        ));
        s.write(|tx| tx.remove("c")).unwrap();
        s.write(|tx| tx.remove("d")).unwrap();
        s.write(|tx| tx.remove("B")).unwrap();
        s.write(|tx| tx.remove("A")).unwrap();
        assert!(matches!(
            s.write(|tx| tx.remove("A")),
            Err(Error::NotFound(_))
        ));
        // Ids are never reused.
        let e = create(&s, Kind::Active, "e", "").unwrap();
        assert!(e.id > c.id);
    }

    #[test]
    fn commit_keeps_id_and_children_follow() {
        let (_d, s) = store();
        let a = create(&s, Kind::Active, "a", "").unwrap();
        let id = commit(&s, "a", "A").unwrap();
        assert_eq!(id, a.id);
        create(&s, Kind::Active, "b", "A").unwrap();
        let (_, info, _) = s.read(|tx| tx.get_info("b")).unwrap();
        assert_eq!(info.parent, "A");
        assert!(matches!(
            s.read(|tx| tx.get_info("a")),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn labels_update_and_rollback() {
        let (_d, s) = store();
        s.write(|tx| {
            tx.create(
                Kind::Active,
                "a",
                "",
                &labels(&[("l1", "v1"), ("empty", "")]),
            )
        })
        .unwrap();
        let (_, info, _) = s.read(|tx| tx.get_info("a")).unwrap();
        assert_eq!(info.labels, labels(&[("l1", "v1")]));
        assert_eq!(info.created, info.updated);

        let u = s
            .write(|tx| {
                tx.update(
                    "a",
                    &labels(&[("l1", "new"), ("l2", "v2"), ("l3", "x")]),
                    &["labels.l1".into(), "labels.l2".into()],
                )
            })
            .unwrap();
        assert_eq!(u.labels, labels(&[("l1", "new"), ("l2", "v2")]));
        assert!(u.updated > info.updated);
        let u = s
            .write(|tx| tx.update("a", &BTreeMap::new(), &["labels.l1".into()]))
            .unwrap();
        assert_eq!(u.labels, labels(&[("l2", "v2")]));
        assert!(matches!(
            s.write(|tx| tx.update("a", &BTreeMap::new(), &["parent".into()])),
            Err(Error::InvalidArgument(_))
        ));
        // A failing closure rolls its transaction back.
        let r: Result<(), Error> = s.write(|tx| {
            tx.create(Kind::Active, "b", "", &BTreeMap::new())?;
            Err(Error::Corrupt("test".into()))
        });
        assert!(r.is_err());
        assert!(s.read(|tx| tx.lookup("b")).unwrap().is_none());
    }

    #[test]
    fn reopen_keeps_state() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metadata.db");
        {
            let s = MetaStore::open(&p).unwrap();
            create(&s, Kind::Active, "a", "").unwrap();
            s.write(|tx| {
                tx.commit(
                    "a",
                    "A",
                    Usage {
                        size: 4096,
                        inodes: 1,
                    },
                    &labels(&[("k", "v")]),
                )
            })
            .unwrap();
        }
        let s = MetaStore::open(&p).unwrap();
        let (_, info, usage) = s.read(|tx| tx.get_info("A")).unwrap();
        assert_eq!(info.kind, Kind::Committed);
        assert_eq!(info.labels, labels(&[("k", "v")]));
        assert_eq!(
            usage,
            Usage {
                size: 4096,
                inodes: 1
            }
        );
        let all = s
            .read(|tx| tx.walk(&Filter::parse_all::<&str>(&[]).unwrap()))
            .unwrap();
        assert_eq!(all, vec![info]);
    }
}
