//! What a partition's state is, as everyone but the state module sees it:
//! a [`Snapshot`] (statistics, counters and next offset, committed
//! together) and the [`Fingerprint`] of a record. The state module makes
//! them from sled; the exporter, the files folder, the proofs and the
//! commands read them.

use serde::{Deserialize, Serialize};

use crate::kafka::{Offset, PartitionId};
use crate::model::aggregate::Aggregates;

/// Identifies one record, so a stored offset can be checked against the
/// topic: after a topic is deleted and re-created, the record at an old
/// offset is missing or different.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint {
    pub offset: Offset,
    pub key_hash: u64,
    pub value_hash: u64,
}

impl Fingerprint {
    pub fn of(offset: Offset, key: Option<&[u8]>, value: Option<&[u8]>) -> Self {
        Fingerprint {
            offset,
            key_hash: key.map_or(0, fnv1a),
            value_hash: value.map_or(0, fnv1a),
        }
    }
}

/// FNV-1a, 64 bit: stable across builds and versions, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Per-partition counts since the state began (or was last reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub counted: u64,
    pub duplicates: u64,
    pub malformed: u64,
}

/// One committed, consistent view of a partition's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub partition: PartitionId,
    pub epoch: u64,
    pub next_offset: Offset,
    pub aggregates: Aggregates,
    pub counters: Counters,
    pub last_record: Option<Fingerprint>,
    pub anchor: Option<Fingerprint>,
    pub last_commit_unix_ms: Option<i64>,
}

impl Snapshot {
    pub(crate) fn empty(partition: PartitionId) -> Self {
        Snapshot {
            partition,
            epoch: 0,
            next_offset: 0,
            aggregates: Aggregates::new(),
            counters: Counters::default(),
            last_record: None,
            anchor: None,
            last_commit_unix_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable() {
        // Pinned: a stored fingerprint must mean the same after an upgrade.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
