//! The `agent-activator` binary: `serve`, `check`, `node-agent` and `demo-sandbox`.

// Outside tests nothing unwraps: a failure is an error value (or a documented `expect` on an
// invariant). Tests unwrap freely. (The workspace-wide lints live in Cargo.toml `[lints]`.)
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use agent_activator::config::Config;
use agent_activator::{loader, logging, server, shutdown};

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
        /// The configuration; repeat it to load several Knative Service manifests as
        /// one pool each.
        #[arg(long, short, required = true)]
        config: Vec<PathBuf>,
        /// Overrides `listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Overrides `admin_listen`.
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
    },
    /// Validate a configuration and exit.
    Check {
        /// Repeatable, as for `serve`.
        #[arg(long, short, required = true)]
        config: Vec<PathBuf>,
    },
    /// Run the node agent: freezes and thaws sandbox pods' cgroups on this node
    /// (the `node_agent` section of the configuration).
    NodeAgent {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the stateful demo sandbox (what `config/local.yaml` starts per session).
    DemoSandbox(agent_activator::demo::DemoOptions),
}

/// The `--config` files, comma-separated, for messages.
fn display(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
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
        Command::NodeAgent { config: path } => node_agent(&path),
        Command::Check { config } => match loader::load_all(&config) {
            Ok(_) => {
                println!("{}: ok", display(&config));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", display(&config));
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Serve {
            config: path,
            listen,
            admin_listen,
        } => {
            let mut config = match loader::load_all(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", display(&path));
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if config.is_node_agent_only() {
                eprintln!(
                    "{}: backend.endpoints: kind: static needs at least one endpoint \
                     (this file configures only the node agent: run `node-agent`)",
                    display(&path)
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            if let Some(addr) = listen {
                config.listen = addr;
            }
            if let Some(addr) = admin_listen {
                config.admin_listen = addr;
            }
            // Held until exit: dropping it flushes the log writer thread.
            let _log = logging::init(&config.log);
            serve(config)
        }
    }
}

fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let running = match server::start(config).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                eprintln!("cannot start: {e}");
                return if e.is_config() {
                    ExitCode::from(EXIT_CONFIG)
                } else {
                    ExitCode::FAILURE
                };
            }
        };
        let outcome = running.run_until(shutdown::signal()).await;
        tracing::info!(complete = outcome.complete, cut = outcome.cut, "stopped");
        ExitCode::SUCCESS
    })
}

fn node_agent(path: &std::path::Path) -> ExitCode {
    let config = match loader::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(agent) = config.node_agent else {
        eprintln!(
            "{}: node_agent: the section is required by `node-agent`",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    logging::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent_activator::node_agent::run(agent, shutdown::signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(agent_activator::node_agent::StartError::Config(e)) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("node-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
