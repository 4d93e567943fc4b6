//! The `agent-activator` binary: `serve` and `check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use agent_activator::config::Config;

#[derive(Parser)]
#[command(
    name = "agent-activator",
    version,
    about = "Session-aware activator proxy for AI-agent sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Overrides `listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Overrides `admin_listen`.
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
    },
    /// Validate a configuration and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the stateful demo sandbox (what `config/local.yaml` starts per session).
    DemoSandbox(agent_activator::demo::DemoOptions),
}

/// sysexits EX_CONFIG-like code for an invalid configuration (linkerd uses 64).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DemoSandbox(opts) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(agent_activator::demo::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo-sandbox: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Serve { config, .. } => match Config::load(&config) {
            Ok(_) => {
                eprintln!("serve: the proxy is not wired yet");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}
