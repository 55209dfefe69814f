//! The one error a sync step returns: which boundary failed, whether a later invocation may
//! simply try again, and a stable code for logs, alarms and the run history.

use crate::config::ConfigError;
use crate::lever::LeverError;
use crate::rows::RowError;
use crate::warehouse::WarehouseError;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Lever(#[from] LeverError),
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    #[error(transparent)]
    Row(#[from] RowError),
    #[error("{0}")]
    Invariant(String),
    /// The invocation stopped at a checkpoint (fault injection: models a crash or a timeout,
    /// so nothing more is written).
    #[error("stopped at {0}")]
    Killed(&'static str),
}

impl SyncError {
    pub fn code(&self) -> &'static str {
        match self {
            SyncError::Config(_) => "config_invalid",
            SyncError::Lever(e) => e.code(),
            SyncError::Warehouse(e) => e.code(),
            SyncError::Row(_) => "record_unexpected_type",
            SyncError::Invariant(_) => "invariant",
            SyncError::Killed(_) => "killed",
        }
    }

    /// A later invocation can resume and may succeed without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            SyncError::Lever(e) => e.is_retryable(),
            SyncError::Warehouse(e) => e.is_retryable(),
            SyncError::Killed(_) => true,
            _ => false,
        }
    }
}
