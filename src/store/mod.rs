//! What the consumer keeps on disk: the sled state ([`state`], the only
//! module that touches sled), the snapshots everyone else sees
//! ([`snapshot`]), the files folder and its paths ([`folders`]), the
//! proofs of published files ([`proof`]), the partition-file format
//! ([`published`]), the one writer of files others read
//! ([`atomic_file`]), the records of the snapshot topic
//! ([`changelog`]) and the fence of partition files that processes share
//! ([`fence`]).

pub mod atomic_file;
pub mod changelog;
pub(crate) mod fence;
pub mod folders;
pub mod proof;
pub mod published;
pub mod snapshot;
pub mod state;
