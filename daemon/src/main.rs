//! `payoutd`: pays campaign vouchers and points through the Money API.
//!
//! A thin entry point: parse the command line, load and check the configuration, set up
//! logging, and call into `payout-core`.

mod campaign;
mod config;
mod dead_letters;
mod ident;
mod run;
mod schedule;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use payout_core::domain::OperatorCommand;

use crate::config::{LogFormat, Settings};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "payoutd",
    version,
    about = "Pays campaign vouchers and points through the Money API, each row at most once."
)]
struct Cli {
    /// Configuration file (TOML). Every key can be overridden by PAYOUTD_<SECTION>__<KEY>.
    #[arg(long, global = true, value_name = "PATH", env = "PAYOUTD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground (systemd runs this).
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Operate on campaigns.
    #[command(subcommand)]
    Campaign(CampaignCommand),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// List and requeue dead letters (rows that need a person).
    #[command(subcommand)]
    DeadLetters(dead_letters::DeadLettersCommand),
}

#[derive(Debug, Subcommand)]
enum CampaignCommand {
    /// READY -> RUNNING: start paying the campaign (queued behind earlier RUNNING campaigns).
    Start { id: i64 },
    /// RUNNING -> PAUSED: stop sending; requests in flight finish. Resume with `resume`.
    Pause { id: i64 },
    /// PAUSED or STOPPED -> RUNNING: continue with the rows not yet paid.
    Resume { id: i64 },
    /// Emergency stop: nothing new is sent; requests in flight finish and are recorded.
    Stop { id: i64 },
    /// Counts per row status, failure rate, throughput and ETA.
    Status {
        /// The campaign; without it, every campaign not yet COMPLETED.
        id: Option<i64>,
        /// Print JSON for machines.
        #[arg(long)]
        json: bool,
        /// Redraw a progress line every second until the campaign is COMPLETED (needs ID).
        #[arg(long)]
        watch: bool,
    },
    /// Every campaign with its status and progress.
    List {
        /// Print JSON for machines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration with secrets masked.
    Check,
}

fn init_logging(settings: &Settings) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // The configuration has already checked the filter; fall back rather than fail anyway.
    let filter =
        EnvFilter::try_new(&settings.log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match settings.log.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Auto if !std::io::stderr().is_terminal() => {
            builder.json().flatten_event(true).with_current_span(false).init()
        }
        LogFormat::Text | LogFormat::Auto => {
            builder.with_ansi(std::io::stderr().is_terminal()).init()
        }
    }
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    let explicit = cli.config.is_some();
    let path = cli.config.clone().unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_FILE));
    let settings = Settings::load(Some(&path), explicit)?;
    init_logging(&settings);
    match cli.command {
        Command::Run => run::run(settings).await,
        Command::Migrate => {
            let pool = run::connect(&settings).await?;
            let applied = payout_core::db::migrate(&pool).await.context("migration failed")?;
            if applied.is_empty() {
                println!("database is up to date");
            }
            for m in applied {
                println!("applied {m}");
            }
            Ok(())
        }
        Command::Campaign(c) => {
            let (id, op) = match c {
                // Reports run on one connection of their own (see `campaign::status`).
                CampaignCommand::Status { id, json, watch: false } => {
                    let mut c = run::connect_one(&settings).await?;
                    return campaign::status(&mut c, id, json).await;
                }
                CampaignCommand::Status { id, json, watch: true } => {
                    return campaign::watch(&run::connect(&settings).await?, id, json).await;
                }
                CampaignCommand::List { json } => {
                    let mut c = run::connect_one(&settings).await?;
                    return campaign::list(&mut c, json).await;
                }
                CampaignCommand::Start { id } => (id, OperatorCommand::Start),
                CampaignCommand::Pause { id } => (id, OperatorCommand::Pause),
                CampaignCommand::Resume { id } => (id, OperatorCommand::Resume),
                CampaignCommand::Stop { id } => (id, OperatorCommand::Stop),
            };
            let pool = run::connect(&settings).await?;
            let actor = format!("cli:{}", ident::os_user());
            campaign::command(&pool, id, op, &actor).await
        }
        Command::DeadLetters(c) => {
            let pool = run::connect(&settings).await?;
            let actor = format!("cli:{}", ident::os_user());
            dead_letters::command(&pool, &run::kinds(), c, &actor).await
        }
        Command::Config(ConfigCommand::Check) => {
            print!("{}", settings.masked_toml());
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match main_inner(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("payoutd: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
