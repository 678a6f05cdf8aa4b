//! `cgtproxy forward`: the built-in transparent forwarder (issue 8). Not built yet.

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no target has an upstream; nothing to forward")]
    NothingToDo,
}

/// Runs the forwarder for every target with an `upstream`.
pub fn run(cfg: &Config) -> Result<(), ForwardError> {
    if cfg.targets.iter().all(|t| t.upstream.is_none()) {
        return Err(ForwardError::NothingToDo);
    }
    Err(ForwardError::NothingToDo)
}
