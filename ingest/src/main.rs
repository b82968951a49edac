use std::process::ExitCode;

use clap::Parser;
use ingest::cli::{Cli, Command};
use ingest::config::Config;
use ingest::startup::Application;

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = shared::telemetry::init() {
        eprintln!("invalid configuration: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => return serve().await,
        Command::Backfill(args) => ingest::cli::backfill(args).await,
        Command::Reconcile(args) => ingest::cli::reconcile(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(code = e.code(), error = %e, "command failed");
            eprintln!("ingest: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn serve() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let addr = config.addr;
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "ingest failed to start");
            eprintln!("ingest failed to start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %addr, port = app.port(), "ingest listening");
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "ingest server failed");
            ExitCode::FAILURE
        }
    }
}
