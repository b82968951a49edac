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
            let app = Application::build(config)
                .await
                .map_err(|e| e.to_string())?;
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
        Command::Redrive { ids } => {
            let pool = startup::database(&config)
                .await
                .map_err(|e| e.to_string())?;
            let report = projector::redrive::redrive(&pool, &config, &ids)
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
