//! The SQLite index of the store: its tables, and opening it with the settings the
//! store's crash rules depend on.

use std::path::Path;

use rusqlite::Connection;

use super::error::{Result, StoreError};

/// `PRAGMA user_version` of the schema below. Bump it with a migration.
pub const SCHEMA_VERSION: i64 = 1;

/// One row per chunk the node knows, present or not. `slot` is the chunk's place in the
/// store file (byte `slot * SLOT_SIZE`); `present` is 1 only once its bytes are synced.
/// `gen` is unique per row ever inserted (`meta.next_gen`): a chunk released and
/// reserved again, even in the same slot, is a new generation, so a write made for the
/// old one can never mark the new one present.
/// `owners` are layers (their index digest); `refs` says which owner uses which chunk,
/// so a chunk's refcount is its number of rows in `refs`. `free_slots` holds slot
/// numbers below `meta.next_slot` that no chunk uses.
const SCHEMA: &str = "
CREATE TABLE chunks(
    digest BLOB PRIMARY KEY CHECK (length(digest) = 32),
    slot INTEGER NOT NULL UNIQUE CHECK (slot >= 0),
    size INTEGER NOT NULL CHECK (size >= 0 AND size <= 4194304),
    present INTEGER NOT NULL DEFAULT 0 CHECK (present IN (0, 1)),
    gen INTEGER NOT NULL,
    last_access INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE owners(
    owner TEXT PRIMARY KEY,
    created INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE refs(
    owner TEXT NOT NULL REFERENCES owners(owner),
    digest BLOB NOT NULL REFERENCES chunks(digest),
    PRIMARY KEY (owner, digest)
) WITHOUT ROWID;
CREATE INDEX refs_by_digest ON refs(digest);
CREATE TABLE free_slots(slot INTEGER PRIMARY KEY);
CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta(key, value) VALUES ('next_slot', 0), ('next_gen', 1);
";

/// Opens (creating if needed) the index at `path`: WAL journal, `synchronous=FULL`
/// (a committed release must survive a crash before its holes are punched), foreign
/// keys on, and the schema at [`SCHEMA_VERSION`].
pub fn open(path: &Path) -> Result<Connection> {
    let db = |what: &str| {
        let what = what.to_string();
        move |source| StoreError::Db {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut conn = Connection::open(path).map_err(db("opening the index"))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(db("setting the busy timeout"))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(db("switching to WAL"))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db("setting synchronous=FULL"))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(db("enabling foreign keys"))?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(db("starting the schema transaction"))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db("reading the schema version"))?;
    match version {
        0 => {
            tx.execute_batch(SCHEMA)
                .map_err(db("creating the schema"))?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(db("writing the schema version"))?;
        }
        SCHEMA_VERSION => {}
        found => {
            return Err(StoreError::SchemaVersion {
                path: path.to_path_buf(),
                found,
                known: SCHEMA_VERSION,
            });
        }
    }
    tx.commit().map_err(db("committing the schema"))?;
    Ok(conn)
}
