//! Snapshot metadata in redb: one ACID transaction per change, so a crash
//! leaves either the old or the new state, never half of one.
//!
//! Records are keyed by snapshot name (containerd's key for active and view
//! snapshots, the commit name for committed ones) and serialized as JSON,
//! which keeps the file readable by tools and the format easy to extend.
//! Directories on disk are named by the record's numeric id, never by the
//! name, so names may contain anything.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sluice_format::oci::Descriptor;

use crate::error::SnapshotError;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Where a lazily mounted snapshot's content comes from: enough to mount it
/// again after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteSource {
    /// Image reference the layer was resolved from (host/repository@digest).
    pub image: String,
    /// The layer as the image lists it (its digest is the one containerd knows).
    pub layer: Descriptor,
    /// The zstd:chunked blob that is mounted: the layer itself or its twin.
    pub lazy: Descriptor,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the Unix epoch.
    pub created: u64,
    pub updated: u64,
    /// Disk usage, fixed at commit.
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub inodes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteSource>,
}

pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The store. All methods are blocking.
pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let db = Database::create(path)
            .map_err(|e| SnapshotError::Store(format!("opening {}: {e}", path.display())))?;
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(Store { db })
    }

    pub fn get(&self, name: &str) -> Result<Option<Record>, SnapshotError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let Some(v) = table.get(name)? else {
            return Ok(None);
        };
        Ok(Some(serde_json::from_slice(v.value())?))
    }

    pub fn require(&self, name: &str) -> Result<Record, SnapshotError> {
        self.get(name)?
            .ok_or_else(|| SnapshotError::NotFound(name.to_owned()))
    }

    pub fn list(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_owned(), serde_json::from_slice(v.value())?));
        }
        Ok(out)
    }

    /// Creates `name` with a fresh id. `prepare_dirs` runs inside the
    /// transaction: if it fails, nothing is recorded.
    pub fn create(
        &self,
        name: &str,
        mut record: Record,
        prepare_dirs: impl FnOnce(u64) -> Result<(), SnapshotError>,
    ) -> Result<Record, SnapshotError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(SNAPSHOTS)?;
            if table.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.to_owned()));
            }
            if let Some(parent) = &record.parent {
                let Some(p) = table.get(parent.as_str())? else {
                    return Err(SnapshotError::NotFound(format!("parent {parent}")));
                };
                let p: Record = serde_json::from_slice(p.value())?;
                if p.kind != Kind::Committed {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "parent {parent} is {}, not committed",
                        p.kind.as_str()
                    )));
                }
            }
            let mut counters = tx.open_table(COUNTERS)?;
            let id = counters.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
            counters.insert(NEXT_ID, id + 1)?;
            record.id = id;
            prepare_dirs(id)?;
            table.insert(name, serde_json::to_vec(&record)?.as_slice())?;
        }
        tx.commit()?;
        Ok(record)
    }

    /// Turns active snapshot `key` into committed snapshot `name`.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: (i64, i64),
        remote: Option<RemoteSource>,
    ) -> Result<Record, SnapshotError> {
        let tx = self.db.begin_write()?;
        let record;
        {
            let mut table = tx.open_table(SNAPSHOTS)?;
            let mut r: Record = match table.get(key)? {
                Some(v) => serde_json::from_slice(v.value())?,
                None => return Err(SnapshotError::NotFound(key.to_owned())),
            };
            if r.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} is {}, only active snapshots can be committed",
                    r.kind.as_str()
                )));
            }
            if table.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.to_owned()));
            }
            table.remove(key)?;
            r.kind = Kind::Committed;
            r.labels = labels;
            r.updated = now_nanos();
            (r.size, r.inodes) = usage;
            if remote.is_some() {
                r.remote = remote;
            }
            table.insert(name, serde_json::to_vec(&r)?.as_slice())?;
            record = r;
        }
        tx.commit()?;
        Ok(record)
    }

    /// Deletes `name`, refusing while other snapshots have it as parent.
    pub fn remove(&self, name: &str) -> Result<Record, SnapshotError> {
        let tx = self.db.begin_write()?;
        let record;
        {
            let mut table = tx.open_table(SNAPSHOTS)?;
            record = match table.get(name)? {
                Some(v) => serde_json::from_slice::<Record>(v.value())?,
                None => return Err(SnapshotError::NotFound(name.to_owned())),
            };
            for row in table.iter()? {
                let (k, v) = row?;
                let child: Record = serde_json::from_slice(v.value())?;
                if child.parent.as_deref() == Some(name) {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "cannot remove snapshot {name}: snapshot {} depends on it",
                        k.value()
                    )));
                }
            }
            table.remove(name)?;
        }
        tx.commit()?;
        Ok(record)
    }

    /// Applies `change` to the record of `name` and stores it.
    pub fn update(
        &self,
        name: &str,
        change: impl FnOnce(&mut Record) -> Result<(), SnapshotError>,
    ) -> Result<Record, SnapshotError> {
        let tx = self.db.begin_write()?;
        let record;
        {
            let mut table = tx.open_table(SNAPSHOTS)?;
            let mut r: Record = match table.get(name)? {
                Some(v) => serde_json::from_slice(v.value())?,
                None => return Err(SnapshotError::NotFound(name.to_owned())),
            };
            change(&mut r)?;
            r.updated = now_nanos();
            table.insert(name, serde_json::to_vec(&r)?.as_slice())?;
            record = r;
        }
        tx.commit()?;
        Ok(record)
    }
}
