//! payoutd's engine: the `PayoutKind` extension point, the Money client, the global rate limiter,
//! the partitioned executor, the periodic sweeps and the MySQL repository they share.
//!
//! Nothing here parses command lines or configuration files; the `payoutd` binary builds the
//! plain settings structs defined here and hands them in.

pub mod alerts;
pub mod breaker;
pub mod db;
pub mod dead_letters;
pub mod domain;
pub mod engine;
pub mod kind;
pub mod lease;
pub mod money;
pub mod plan;
pub mod rate;
pub mod repo;
pub mod retry;
mod reused;
pub mod sweep;

pub use domain::{CampaignId, CampaignStatus, TargetId, TargetStatus};
pub use kind::{
    GrantRequest, IdempotencyKey, InvalidRow, KindRegistry, PayoutKind, ValidationContext,
};
