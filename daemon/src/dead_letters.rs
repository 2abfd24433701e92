//! `payoutd dead-letters ...`: list the rows that need a person, and requeue them (a re-grant
//! with the rows' own idempotency keys).

use anyhow::Context;
use chrono::NaiveDateTime;
use clap::{Args, Subcommand};
use payout_core::db::{DbPool, conn};
use payout_core::dead_letters::{self, DeadLetter, ListFilter, RequeueReport, Selection};
use payout_core::{CampaignId, CampaignStatus, KindRegistry};
use serde::Serialize;

/// Longest message shown in the table view (`--json` has it whole).
const TABLE_MESSAGE_CHARS: usize = 60;

#[derive(Debug, Subcommand)]
pub(crate) enum DeadLettersCommand {
    /// Unresolved dead letters, newest first (resolved ones too with --all).
    List(ListArgs),
    /// Re-grant dead rows: back to PENDING with a fresh attempt budget and the same
    /// idempotency key; the dead letters are marked resolved and the action is audited.
    Requeue(RequeueArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only this campaign's dead letters.
    #[arg(long, value_name = "ID")]
    campaign: Option<i64>,
    /// Include resolved dead letters.
    #[arg(long)]
    all: bool,
    /// Print a JSON array with every column, for machines.
    #[arg(long)]
    json: bool,
    /// Show at most this many (the newest).
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    limit: u32,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").args(["campaign", "ids"]).required(true)))]
pub(crate) struct RequeueArgs {
    /// Every unresolved dead letter of this campaign.
    #[arg(long, value_name = "ID")]
    campaign: Option<i64>,
    /// These dead letters (dead-letter ids as `list` shows them, comma separated).
    #[arg(long, value_name = "ID,...", value_delimiter = ',', num_args = 1..)]
    ids: Vec<i64>,
    /// Report what would be requeued and change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub(crate) async fn command(
    pool: &DbPool,
    kinds: &KindRegistry,
    command: DeadLettersCommand,
    actor: &str,
) -> anyhow::Result<()> {
    match command {
        DeadLettersCommand::List(args) => list(pool, args).await,
        DeadLettersCommand::Requeue(args) => requeue(pool, kinds, args, actor).await,
    }
}

/// A dead letter as `list --json` prints it: every column.
#[derive(Debug, Serialize)]
struct DeadLetterJson<'a> {
    id: i64,
    campaign_id: i64,
    target_kind: &'a str,
    target_id: i64,
    error_code: &'a str,
    error_message: &'a str,
    attempts: i32,
    created_at: String,
    resolved_at: Option<String>,
    resolution: Option<&'a str>,
    resolved_by: Option<&'a str>,
}

fn time(t: NaiveDateTime) -> String {
    format!("{}Z", t.format("%Y-%m-%dT%H:%M:%S%.3f"))
}

impl<'a> From<&'a DeadLetter> for DeadLetterJson<'a> {
    fn from(d: &'a DeadLetter) -> Self {
        DeadLetterJson {
            id: d.id,
            campaign_id: d.campaign_id,
            target_kind: &d.target_kind,
            target_id: d.target_id,
            error_code: &d.error_code,
            error_message: &d.error_message,
            attempts: d.attempts,
            created_at: time(d.created_at),
            resolved_at: d.resolved_at.map(time),
            resolution: d.resolution.as_deref(),
            resolved_by: d.resolved_by.as_deref(),
        }
    }
}

fn shorten(s: &str, max_chars: usize) -> String {
    let one_line = s.replace(['\n', '\r', '\t'], " ");
    match one_line.char_indices().nth(max_chars.saturating_sub(1)) {
        Some((i, _)) if one_line.chars().count() > max_chars => format!("{}…", &one_line[..i]),
        Some(_) | None => one_line,
    }
}

async fn list(pool: &DbPool, args: ListArgs) -> anyhow::Result<()> {
    let filter = ListFilter {
        campaign: args.campaign.map(CampaignId),
        include_resolved: args.all,
        limit: args.limit,
    };
    let mut c = conn(pool).await.context("cannot reach the database")?;
    let listing = dead_letters::list(&mut c, &filter).await?;
    drop(c);
    let which = if args.all { "dead letters" } else { "unresolved dead letters" };
    let scope = args.campaign.map(|id| format!(" of campaign {id}")).unwrap_or_default();
    let more = (listing.total > listing.letters.len() as u64).then(|| {
        format!(
            "showing the newest {} of {} {which}{scope}; use --limit to see more",
            listing.letters.len(),
            listing.total
        )
    });
    if args.json {
        let out: Vec<DeadLetterJson<'_>> = listing.letters.iter().map(Into::into).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        // stdout stays one JSON document; the note goes to stderr.
        if let Some(more) = more {
            eprintln!("payoutd: {more}");
        }
        return Ok(());
    }
    if listing.letters.is_empty() {
        println!("no {which}{scope}");
        return Ok(());
    }
    let resolved_col = if args.all { format!(" {:<10}", "resolved") } else { String::new() };
    println!(
        "{:>10} {:>10} {:<8} {:>12} {:<24} {:>8} {:<24}{resolved_col} message",
        "id", "campaign", "kind", "target id", "error code", "attempts", "created at"
    );
    for d in &listing.letters {
        let resolved_col = if args.all {
            format!(" {:<10}", d.resolution.as_deref().unwrap_or("-"))
        } else {
            String::new()
        };
        println!(
            "{:>10} {:>10} {:<8} {:>12} {:<24} {:>8} {:<24}{resolved_col} {}",
            d.id,
            d.campaign_id,
            d.target_kind,
            d.target_id,
            d.error_code,
            d.attempts,
            time(d.created_at),
            shorten(&d.error_message, TABLE_MESSAGE_CHARS)
        );
    }
    if let Some(more) = more {
        println!("{more}");
    }
    Ok(())
}

async fn requeue(
    pool: &DbPool,
    kinds: &KindRegistry,
    args: RequeueArgs,
    actor: &str,
) -> anyhow::Result<()> {
    let selection = match args.campaign {
        Some(id) => Selection::Campaign(CampaignId(id)),
        None => Selection::Ids(args.ids),
    };
    let mut c = conn(pool).await.context("cannot reach the database")?;
    let report = dead_letters::requeue(&mut c, kinds, &selection, actor, args.dry_run).await?;
    print_report(&report);
    Ok(())
}

fn print_report(report: &RequeueReport) {
    for s in &report.skipped {
        println!("{s}");
    }
    let verb = if report.dry_run { "would requeue" } else { "requeued" };
    for c in &report.campaigns {
        println!("{verb} {} rows of campaign {}", c.rows, c.campaign);
        let id = c.campaign;
        let Some(status) = c.status.as_deref() else {
            println!("campaign {id} does not exist: its requeued rows wait until it does");
            continue;
        };
        if c.reopened && !report.dry_run {
            println!("campaign {id}: COMPLETED -> RUNNING; the daemon pays the requeued rows");
            continue;
        }
        match CampaignStatus::parse(status) {
            Ok(CampaignStatus::Completed) => {
                println!("campaign {id} is COMPLETED: the requeue would set it RUNNING again")
            }
            Ok(CampaignStatus::Running) => {
                println!("campaign {id} is RUNNING: the daemon pays the requeued rows")
            }
            Ok(s @ (CampaignStatus::Paused | CampaignStatus::Stopped)) => println!(
                "campaign {id} is {s}: the requeued rows wait until it is resumed \
                 (payoutd campaign resume {id})"
            ),
            Ok(CampaignStatus::Ready) => println!(
                "campaign {id} is READY: the requeued rows wait until it is started \
                 (payoutd campaign start {id})"
            ),
            Err(_) => println!(
                "campaign {id} has the unknown status {status:?}: the requeued rows wait until \
                 it is RUNNING"
            ),
        }
    }
    if report.campaigns.is_empty() {
        println!("nothing {}", if report.dry_run { "would be requeued" } else { "requeued" });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_messages_are_shortened_to_one_line() {
        assert_eq!(shorten("short", 10), "short");
        assert_eq!(shorten("exactly10!", 10), "exactly10!");
        assert_eq!(shorten("a longer message", 8), "a longe…");
        assert_eq!(shorten("two\nlines", 20), "two lines");
        assert_eq!(shorten("가나다라", 3), "가나…");
    }
}
