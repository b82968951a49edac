//! The `ingest` command line: `serve` (the default) answers webhooks; `backfill` and
//! `reconcile` read the Stripe API into the same log (SPEC §11).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use shared::kafka::{
    check_cluster, ensure_topics, KafkaUnreachable, TopicSpec, PREFLIGHT_DEADLINE,
};

use crate::append::EventLog;
use crate::backfill::{self, BackfillError, BackfillOptions, Resource};
use crate::config::{ApiConfig, ConfigError, LogConfig};
use crate::reconcile::{self, ReconcileError, SinceError};
use crate::stripe_api::rate::default_rate;
use crate::stripe_api::retry::RetryPolicy;
use crate::stripe_api::{ClientSettings, StripeApiError, StripeClient};

#[derive(Debug, Parser)]
#[command(
    name = "ingest",
    version,
    about = "Verifies Stripe webhooks and appends them to Kafka; backfills and reconciles from the Stripe API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve POST /webhooks/stripe (what `ingest` without a subcommand does).
    Serve,
    /// Append a snapshot of every customer, subscription, checkout session and active
    /// entitlement summary to the log (STRIPE_API_KEY, STRIPE_API_BASE).
    Backfill(BackfillArgs),
    /// Append every event of GET /v1/events since a time: after an outage, or daily from cron.
    Reconcile(ReconcileArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Read a connected account (sends `Stripe-Account`); its records carry `account`.
    #[arg(long, value_parser = parse_account)]
    pub account: Option<String>,
    /// API requests per second [default: 20 for test keys, 80 for live keys; Stripe allows 25
    /// and 100].
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Attempts per request before giving up (429, 5xx and network errors are retried).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub max_attempts: u32,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Continue after the last object the previous run wrote (its checkpoint in --state-dir).
    #[arg(long)]
    pub resume: bool,
    /// Where the checkpoint file is kept.
    #[arg(long, env = "BACKFILL_STATE_DIR", default_value = ".backfill-state")]
    pub state_dir: PathBuf,
    /// What to read, comma-separated [default: all, in this order].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub resources: Vec<Resource>,
    /// Customers whose entitlements are read at once (still within --rate).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub entitlement_concurrency: u16,
}

#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// From when: an RFC 3339 time (2026-01-31T00:00:00Z) or a duration back from now (1h, 3d).
    #[arg(long)]
    pub since: String,
}

fn parse_account(value: &str) -> Result<String, String> {
    let valid = value.starts_with("acct_")
        && value.len() > 5
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        Ok(value.to_owned())
    } else {
        Err("expected a connected account id, acct_…".into())
    }
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 10_000.0 => Ok(rate),
        _ => Err("expected requests per second, a number in (0, 10000]".into()),
    }
}

/// Why a command could not run or finish. Each variant has a stable code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("invalid configuration: STRIPE_API_KEY: required for this command")]
    MissingApiKey,
    #[error("invalid --since: {0}")]
    Since(#[from] SinceError),
    #[error("{0}")]
    KafkaUnreachable(#[from] KafkaUnreachable),
    #[error("cannot create the Kafka topics: {0}")]
    Topics(#[from] shared::kafka::TopicError),
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Client(#[from] StripeApiError),
    #[error(transparent)]
    Backfill(#[from] BackfillError),
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
}

impl CommandError {
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::Config(_) | CommandError::MissingApiKey => "invalid_configuration",
            CommandError::Since(_) => "invalid_since",
            CommandError::KafkaUnreachable(_)
            | CommandError::Topics(_)
            | CommandError::Producer(_) => "kafka_unavailable",
            CommandError::Client(e) => e.code(),
            CommandError::Backfill(e) => e.code(),
            CommandError::Reconcile(e) => e.code(),
        }
    }

    /// Configuration mistakes exit 2, like the service's; everything else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Config(_) | CommandError::MissingApiKey | CommandError::Since(_) => 2,
            _ => 1,
        }
    }
}

/// The client and the log a command writes to.
struct Target {
    client: StripeClient,
    log: EventLog,
    topic: String,
}

async fn target(api: &ApiArgs) -> Result<Target, CommandError> {
    let log_config = LogConfig::from_env()?;
    let api_config = ApiConfig::from_lookup(|name| std::env::var(name).ok())?
        .ok_or(CommandError::MissingApiKey)?;
    let rate = api.rate.unwrap_or_else(|| {
        use secrecy::ExposeSecret;
        default_rate(api_config.api_key.expose_secret())
    });
    let client = StripeClient::new(ClientSettings {
        api_base: api_config.api_base,
        api_key: api_config.api_key,
        account: api.account.clone(),
        rate,
        timeout: api_config.timeout,
        retry: RetryPolicy {
            max_attempts: api.max_attempts,
            ..RetryPolicy::default()
        },
    })?;
    check_cluster(&log_config.kafka, PREFLIGHT_DEADLINE).await?;
    ensure_topics(
        &log_config.kafka,
        &[
            TopicSpec::event_log(&log_config.events_topic, log_config.events_partitions)
                .holding(log_config.record_bytes),
        ],
        Duration::from_secs(30),
    )
    .await?;
    let log = EventLog::new(
        &log_config.kafka,
        &log_config.events_topic,
        &log_config.dlq_topic,
        log_config.append_timeout,
        log_config.record_bytes,
    )?;
    tracing::info!(topic = %log_config.events_topic, rate, account = ?api.account, "reading the Stripe API");
    Ok(Target {
        client,
        log,
        topic: log_config.events_topic,
    })
}

pub async fn backfill(args: BackfillArgs) -> Result<(), CommandError> {
    let target = target(&args.api).await?;
    let resources = if args.resources.is_empty() {
        Resource::ALL.to_vec()
    } else {
        args.resources.clone()
    };
    let options = BackfillOptions {
        resume: args.resume,
        state_dir: args.state_dir.clone(),
        resources,
        entitlement_concurrency: args.entitlement_concurrency as usize,
    };
    let summary = backfill::run(&target.client, &target.log, &target.topic, &options).await?;
    print_summary(args.api.json, &summary, summary.render());
    Ok(())
}

pub async fn reconcile(args: ReconcileArgs) -> Result<(), CommandError> {
    let since = reconcile::parse_since(&args.since, backfill::unix_now())?;
    let target = target(&args.api).await?;
    let summary = reconcile::run(&target.client, &target.log, since).await?;
    print_summary(args.api.json, &summary, summary.render());
    Ok(())
}

fn print_summary(json: bool, summary: &impl serde::Serialize, text: String) {
    if json {
        match serde_json::to_string(summary) {
            Ok(line) => println!("{line}"),
            Err(e) => tracing::error!(error = %e, "cannot render the summary"),
        }
    } else {
        eprint!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_subcommand_means_serve() {
        let cli = Cli::try_parse_from(["ingest"]).unwrap();
        assert!(cli.command.is_none());
    }

    #[test]
    fn backfill_flags_parse() {
        let cli = Cli::try_parse_from([
            "ingest",
            "backfill",
            "--resume",
            "--account",
            "acct_123",
            "--rate",
            "5",
            "--resources",
            "customers,subscriptions",
        ])
        .unwrap();
        let Some(Command::Backfill(args)) = cli.command else {
            panic!("not backfill")
        };
        assert!(args.resume);
        assert_eq!(args.api.account.as_deref(), Some("acct_123"));
        assert_eq!(args.api.rate, Some(5.0));
        assert_eq!(
            args.resources,
            vec![Resource::Customers, Resource::Subscriptions]
        );
    }

    #[test]
    fn bad_accounts_and_rates_are_refused() {
        for args in [
            &["ingest", "backfill", "--account", "cus_1"][..],
            &["ingest", "backfill", "--rate", "0"],
            &["ingest", "backfill", "--rate", "fast"],
            &["ingest", "reconcile"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
