use std::process::ExitCode;

use clap::{Parser, Subcommand};
use projector::config::Config;
use projector::startup::{self, Application};

/// Projects the Stripe event log into Postgres, publishes entitlement changes, serves the read
/// API. Configuration comes from the environment (see the README).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume `stripe.events`, keep the projections, publish changes, serve the API.
    Run,
    /// Apply the database migrations and exit.
    Migrate,
    /// Rebuild every projection from offset 0 of the log into fresh tables while `run` keeps
    /// serving, then swap atomically and publish only the net differences.
    Rebuild {
        /// Report the customers whose entitlements would change, with before/after; swap nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the summary as one JSON object (for scripts and tests) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A customer's entitlement timeline straight from the log.
    History {
        /// The Stripe customer id (cus_…).
        customer: String,
        /// The Connect account, for a connected account's customer.
        #[arg(long)]
        account: Option<String>,
        /// Print the entitlement object as of this instant (RFC 3339, e.g.
        /// 2026-01-04T00:00:00Z) instead of the timeline.
        #[arg(long, value_parser = projector::history::parse_instant)]
        at: Option<i64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-apply dead letters after a fix: all pending ones, or those with the given ids.
    Redrive {
        /// Dead-letter ids (from the `dead_letters` table); none means all pending.
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = shared::telemetry::init() {
        eprintln!("invalid configuration: {e}");
        return ExitCode::from(2);
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match run(cli.command, config).await {
        Ok(code) => code,
        Err(message) => {
            tracing::error!(error = %message, "projector failed");
            eprintln!("projector: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> Result<ExitCode, String> {
    match command {
        Command::Run => {
            let addr = config.addr;
            let policy = config
                .policy_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none".into());
            let app = match Application::build(config).await {
                Ok(app) => app,
                Err(e) => {
                    tracing::error!(code = e.code(), error = %e, "projector failed to start");
                    eprintln!("projector failed to start ({}): {e}", e.code());
                    return Ok(ExitCode::FAILURE);
                }
            };
            tracing::info!(addr = %addr, port = app.port(), entitlements_config = %policy, "projector listening");
            app.run_until_stopped().await.map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            startup::database(&config)
                .await
                .map_err(|e| e.to_string())?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Rebuild { dry_run, json } => {
            startup::kafka_reachable(&config)
                .await
                .map_err(|e| e.to_string())?;
            let options = projector::rebuild::RebuildOptions { dry_run };
            let report = projector::rebuild::rebuild(&config, options)
                .await
                .map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&report).map_err(|e| e.to_string())?
                );
                return Ok(ExitCode::SUCCESS);
            }
            for d in &report.differences {
                let who = match &d.account {
                    Some(account) => format!("{account}/{}", d.customer),
                    None => d.customer.clone(),
                };
                let before = d
                    .features_before
                    .as_ref()
                    .map(|f| serde_json::Value::from(f.clone()).to_string())
                    .unwrap_or_else(|| "(absent)".into());
                println!(
                    "{who}: features {before} -> {}  (+{:?} -{:?})",
                    serde_json::Value::from(d.features_after.clone()),
                    d.added,
                    d.removed
                );
            }
            if report.differences_truncated {
                println!(
                    "… and {} more",
                    report.changed - report.differences.len() as u64
                );
            }
            println!(
                "{}: {} events in {:.1}s ({:.0} events/s), live paused {:.0} ms, {} customers {}",
                if report.swapped { "rebuilt" } else { "dry run" },
                report.events,
                report.seconds,
                report.events_per_sec,
                report.lock_held_ms,
                report.changed,
                if report.swapped {
                    "changed (messages published)"
                } else {
                    "would change"
                },
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::History {
            customer,
            account,
            at,
            json,
        } => {
            startup::kafka_reachable(&config)
                .await
                .map_err(|e| e.to_string())?;
            let until = at;
            let events =
                projector::history::read_customer_events(&config, account.as_deref(), &customer)?;
            let (timeline, view) = projector::history::replay(
                &events,
                account.as_deref().unwrap_or(""),
                &customer,
                &config.policy,
                until,
            );
            if until.is_some() {
                let Some(view) = view else {
                    return Err(format!(
                        "no events of {customer} at or before {}",
                        projector::projection::entitlements::rfc3339(until.unwrap_or_default())
                    ));
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&view).map_err(|e| e.to_string())?
                );
            } else if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&timeline).map_err(|e| e.to_string())?
                );
            } else {
                if timeline.is_empty() {
                    return Err(format!("no events of {customer} in the log"));
                }
                for entry in &timeline {
                    let mut changes: Vec<String> =
                        entry.added.iter().map(|f| format!("+{f}")).collect();
                    changes.extend(entry.removed.iter().map(|f| format!("-{f}")));
                    println!(
                        "{}  {:<45} {:<32} {:<16} features [{}]  {}",
                        entry.at,
                        entry.event_type,
                        entry.event_id,
                        if changes.is_empty() {
                            "(no feature change)".to_owned()
                        } else {
                            changes.join(" ")
                        },
                        entry.features.join(", "),
                        entry.subscriptions.join(" "),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Redrive { ids } => {
            let pool = startup::database(&config)
                .await
                .map_err(|e| e.to_string())?;
            // Transient failures are retried until they pass; Ctrl-C or SIGTERM ends the
            // process (what was committed stays committed), so nothing needs to fire this.
            let (_keep_open, mut shutdown) = tokio::sync::watch::channel(false);
            let report = projector::redrive::redrive(&pool, &config, &ids, &mut shutdown)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "redriven: {} applied, {} still failing",
                report.applied.len(),
                report.still_failing.len()
            );
            for id in &report.still_failing {
                println!("still failing: dead letter {id}");
            }
            Ok(if report.still_failing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
