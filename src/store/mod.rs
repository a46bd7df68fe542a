//! What the consumer keeps on disk: the sled state ([`state`], the only
//! module that touches sled), the snapshots everyone else sees
//! ([`snapshot`]), the files folder and its paths ([`folders`]), the
//! proofs of published files ([`proof`]), the partition-file format
//! ([`published`]) and the one writer of files others read
//! ([`atomic_file`]).

pub mod atomic_file;
pub mod folders;
pub mod proof;
pub mod published;
pub mod snapshot;
pub mod state;
