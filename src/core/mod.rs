//! The pure core: configuration + cgroups → the desired kernel state → the
//! smallest change, and the judgements made on what the kernel reports. Nothing
//! here does I/O, so all of it is unit-tested without root.

pub mod bpfmaps;
pub mod cgroup;
pub mod links;
pub mod precedence;
pub mod render;
pub mod rpfilter;
pub mod schedule;
pub mod table;
pub mod tree;
