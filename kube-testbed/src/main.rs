//! `kube-testbed serve`: run the Kubernetes API test double and its simulated controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kube_testbed::{Testbed, TestbedOptions};

#[derive(Parser)]
#[command(
    name = "kube-testbed",
    about = "A test double of the Kubernetes API for agent-activator (NOT Kubernetes)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Api {
    AgentSandbox,
    Openkruise,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and simulate the sandbox controller until Ctrl-C.
    Serve {
        /// The agent-activator executable whose `demo-sandbox` subcommand runs each pod.
        #[arg(long)]
        activator_bin: PathBuf,
        /// Write a kubeconfig for this server here (it is printed either way).
        #[arg(long)]
        kubeconfig_out: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Which warm pool to create at start.
        #[arg(long, value_enum, default_value = "agent-sandbox")]
        api: Api,
        /// Name of the SandboxWarmPool / SandboxSet created at start.
        #[arg(long, default_value = "default")]
        pool: String,
        /// Its `spec.replicas`.
        #[arg(long, default_value_t = 2)]
        warm: u32,
        /// Simulated claim binding delay in milliseconds.
        #[arg(long, default_value_t = 50)]
        bind_delay_ms: u64,
        /// Least milliseconds between two controller writes to one claim.
        #[arg(long, default_value_t = 0)]
        step_delay_ms: u64,
        /// Port every pod listens on (each on its own 127.x.y.z); 0 = free ports announced
        /// in the agent-activator.dev/port annotation (needs port_from_annotation: true).
        #[arg(long, default_value_t = 0)]
        pod_port: u16,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let Command::Serve {
        activator_bin,
        kubeconfig_out,
        listen,
        namespace,
        api,
        pool,
        warm,
        bind_delay_ms,
        step_delay_ms,
        pod_port,
    } = Cli::parse().command;
    let opts = TestbedOptions {
        listen,
        activator_bin: Some(activator_bin),
        bind_delay: Duration::from_millis(bind_delay_ms),
        step_delay: Duration::from_millis(step_delay_ms),
        pod_port,
        ..TestbedOptions::default()
    };
    let testbed = match Testbed::start(opts).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("kube-testbed: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let seeded = match api {
        Api::AgentSandbox => testbed.seed_agent_sandbox(&namespace, &pool, warm),
        Api::Openkruise => testbed.seed_openkruise(&namespace, &pool, warm),
    };
    if let Err(e) = seeded {
        eprintln!("kube-testbed: seeding the warm pool failed: {e}");
        return ExitCode::FAILURE;
    }
    let kubeconfig = testbed.kubeconfig(&namespace);
    if let Some(path) = &kubeconfig_out {
        if let Err(e) = std::fs::write(path, &kubeconfig) {
            eprintln!("kube-testbed: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("kubeconfig written to {}", path.display());
    }
    println!(
        "kube-testbed (a test double, not Kubernetes) serving {}",
        testbed.url()
    );
    println!("{kubeconfig}");
    // Pods are killed when the testbed is dropped, so exit through main on SIGINT and
    // SIGTERM alike (the default SIGTERM action would orphan them).
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kube-testbed: cannot watch SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            if let Err(e) = r {
                eprintln!("kube-testbed: cannot wait for Ctrl-C: {e}");
                return ExitCode::FAILURE;
            }
        }
        _ = term.recv() => {}
    }
    drop(testbed);
    ExitCode::SUCCESS
}
