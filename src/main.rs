//! The `ringlb` command: parses the command line, loads the config, starts logging and the
//! server, and waits for a stop signal. Everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use log::{error, info};

use ringlb::config::Config;
use ringlb::server::{Inherited, Invocation, Server};
use ringlb::sys;

const EXAMPLES: &str = "\
Examples:
  ringlb check -c config/ringlb.toml    validate a config and print what it sets up
  ringlb run -c config/ringlb.toml      serve until SIGTERM or SIGINT
  RUST_LOG=debug ringlb run -c FILE     log every connection

Signals: SIGHUP reloads the config file (an invalid one changes nothing). SIGUSR2 starts
the binary at the same path with the same arguments and hands it the listening sockets;
once it serves, this process drains as on SIGTERM (if it fails, this one keeps serving).
SIGTERM, SIGINT or SIGQUIT stops accepting and lets open connections finish for up to
drain_timeout (default 30s); a second one closes them at once. Exit status 0. SIGUSR1,
SIGALRM and SIGTTIN are logged and change nothing.";

#[derive(Parser)]
#[command(name = "ringlb", version, about = "A layer-4 TCP load balancer on io_uring", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer.
    Run {
        /// The TOML configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file and print a summary; exit 1 if it is invalid.
    Check {
        /// The TOML configuration file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match cli.command {
        Command::Check { config: path } => match Config::load(&path) {
            Ok(config) => {
                for warning in &config.warnings {
                    eprintln!("warning: {warning}");
                }
                println!("{}: OK\n{}", path.display(), config.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => run(&config),
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    // Started by an upgrade: the old process waits for this one on the channel it passed.
    let mut inherited = match Inherited::from_env() {
        None => None,
        Some(Ok(inherited)) => Some(inherited),
        Some(Err(e)) => {
            error!("cannot take over from the running process: {e}");
            return ExitCode::FAILURE;
        }
    };
    let invocation = Invocation::current()
        .inspect_err(|e| log::warn!("cannot find this binary's path ({e}); SIGUSR2 will not upgrade"))
        .ok();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Block the handled signals before any thread starts, so only sigtimedwait here sees them.
    let signals = sys::handled_signals();
    if let Err(e) = sys::block_signals(&signals) {
        error!("cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    sys::ignore_sigpipe();
    info!("ringlb {} starting with {}", env!("CARGO_PKG_VERSION"), path.display());
    for warning in &config.warnings {
        log::warn!("{warning}");
    }
    let handed = inherited.as_ref().map_or(0, Inherited::count);
    let server = match Server::start_from_file(&config, path, inherited.as_mut()) {
        Ok(server) => server,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for (name, address) in &server.listen_addrs {
        let listener = config.listeners.iter().find(|l| &l.name == name).expect("listener from config");
        let pools: Vec<String> = listener
            .pools(&config)
            .into_iter()
            .map(|p| &config.pools[p])
            .map(|p| format!("{} ({}, {} backends)", p.name, p.algorithm.name(), p.backends.len()))
            .collect();
        let by_name = if listener.sni.is_empty() { "" } else { " by TLS server name" };
        info!("listener {name} on {address} -> pool {}{by_name}", pools.join(", "));
    }
    if let Some(address) = server.metrics_addr {
        info!("metrics on http://{address}/metrics");
    }
    if let Some(inherited) = inherited {
        info!("upgrade: took over {handed} listening sockets from the running process; telling it to drain");
        if let Err(e) = inherited.ready() {
            log::warn!("upgrade: cannot tell the old process this one serves: {e} (it may have exited)");
        }
    }
    match server.serve_until_stopped(&signals, invocation.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
