//! The commands besides `run` and `forward`: each reads the kernel or the
//! configuration, asks the core, and prints.

pub mod doctor;
pub mod exec;
pub mod explain;
pub mod status;
