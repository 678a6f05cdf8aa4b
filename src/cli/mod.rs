//! The commands besides `run` and `forward`: each reads the kernel or the
//! configuration, asks the core, and prints; and the command line itself
//! (`args`), from which `assets` generates the man pages and completions.

pub mod args;
pub mod assets;
pub mod doctor;
pub mod exec;
pub mod explain;
pub mod status;
