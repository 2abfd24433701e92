//! Domain types: ids and the two state machines (campaign and target row).

use std::fmt;

/// A campaign's id, which is also the `event_id` of its target rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CampaignId(pub i64);

impl fmt::Display for CampaignId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A target row's primary key in its kind's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetId(pub i64);

impl fmt::Display for TargetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `campaigns.status`, as fixed by the operating contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CampaignStatus {
    Ready,
    Running,
    Paused,
    Stopped,
    Completed,
}

/// The unparseable content of a status column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(pub String);

impl CampaignStatus {
    pub const ALL: [CampaignStatus; 5] = [
        CampaignStatus::Ready,
        CampaignStatus::Running,
        CampaignStatus::Paused,
        CampaignStatus::Stopped,
        CampaignStatus::Completed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Ready => "READY",
            CampaignStatus::Running => "RUNNING",
            CampaignStatus::Paused => "PAUSED",
            CampaignStatus::Stopped => "STOPPED",
            CampaignStatus::Completed => "COMPLETED",
        }
    }

    pub fn parse(s: &str) -> Result<Self, UnknownStatus> {
        Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| UnknownStatus(s.to_owned()))
    }

    /// The status an operator's command leads to, or why it is not allowed from `self`.
    pub fn apply(self, command: OperatorCommand) -> Result<CampaignStatus, IllegalTransition> {
        use CampaignStatus as S;
        use OperatorCommand as C;
        match (self, command) {
            (S::Ready, C::Start) => Ok(S::Running),
            // Pausing a campaign the breaker paused makes it the operator's: it will not resume by
            // itself when the breaker closes.
            (S::Running | S::Paused, C::Pause) => Ok(S::Paused),
            (S::Paused | S::Stopped, C::Resume) => Ok(S::Running),
            (S::Ready | S::Running | S::Paused, C::Stop) => Ok(S::Stopped),
            (from, command) => Err(IllegalTransition { from, command }),
        }
    }
}

impl fmt::Display for CampaignStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operator can ask of a campaign through the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorCommand {
    Start,
    Pause,
    Resume,
    Stop,
}

impl OperatorCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorCommand::Start => "start",
            OperatorCommand::Pause => "pause",
            OperatorCommand::Resume => "resume",
            OperatorCommand::Stop => "stop",
        }
    }
}

/// An operator command that the campaign's current status does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a campaign that is {from}", command.as_str())]
pub struct IllegalTransition {
    pub from: CampaignStatus,
    pub command: OperatorCommand,
}

/// A target row's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetStatus {
    Pending,
    InFlight,
    Succeeded,
    Failed,
    Dead,
}

impl TargetStatus {
    pub const ALL: [TargetStatus; 5] = [
        TargetStatus::Pending,
        TargetStatus::InFlight,
        TargetStatus::Succeeded,
        TargetStatus::Failed,
        TargetStatus::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TargetStatus::Pending => "PENDING",
            TargetStatus::InFlight => "IN_FLIGHT",
            TargetStatus::Succeeded => "SUCCEEDED",
            TargetStatus::Failed => "FAILED",
            TargetStatus::Dead => "DEAD",
        }
    }

    pub fn parse(s: &str) -> Result<Self, UnknownStatus> {
        Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| UnknownStatus(s.to_owned()))
    }

    /// Terminal rows need nothing more from the daemon; a campaign completes when all are.
    pub fn is_terminal(self) -> bool {
        match self {
            TargetStatus::Succeeded | TargetStatus::Dead => true,
            TargetStatus::Pending | TargetStatus::InFlight | TargetStatus::Failed => false,
        }
    }
}

impl fmt::Display for TargetStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CampaignStatus as S;
    use OperatorCommand as C;

    #[test]
    fn operator_transitions_follow_the_contract() {
        let table = [
            (S::Ready, C::Start, Some(S::Running)),
            (S::Running, C::Start, None),
            (S::Completed, C::Start, None),
            (S::Paused, C::Start, None),
            (S::Running, C::Pause, Some(S::Paused)),
            (S::Ready, C::Pause, None),
            (S::Paused, C::Pause, Some(S::Paused)),
            (S::Stopped, C::Pause, None),
            (S::Paused, C::Resume, Some(S::Running)),
            (S::Stopped, C::Resume, Some(S::Running)),
            (S::Running, C::Resume, None),
            (S::Completed, C::Resume, None),
            (S::Ready, C::Stop, Some(S::Stopped)),
            (S::Running, C::Stop, Some(S::Stopped)),
            (S::Paused, C::Stop, Some(S::Stopped)),
            (S::Stopped, C::Stop, None),
            (S::Completed, C::Stop, None),
        ];
        for (from, command, want) in table {
            assert_eq!(from.apply(command).ok(), want, "{from} {}", command.as_str());
        }
    }

    #[test]
    fn statuses_round_trip_through_their_column_text() {
        for s in CampaignStatus::ALL {
            assert_eq!(CampaignStatus::parse(s.as_str()), Ok(s));
        }
        for s in TargetStatus::ALL {
            assert_eq!(TargetStatus::parse(s.as_str()), Ok(s));
        }
        assert!(CampaignStatus::parse("running").is_err());
    }
}
