//! The `ringlb` command: parses the command line, loads the config, starts logging and the
//! server, and waits for a stop signal. Everything else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use log::{error, info};

use ringlb::config::Config;
use ringlb::ctl::{self, Action};
use ringlb::server::{Activated, Inherited, Invocation, Notifier, Server};
use ringlb::sys;
use ringlb::{connlog, logger};

const EXAMPLES: &str = "\
Examples:
  ringlb check -c config/ringlb.toml    validate a config and print what it sets up
  ringlb run -c config/ringlb.toml      serve until SIGTERM or SIGINT
  ringlb ctl -c FILE pools              every backend's health, admin state and connections
  ringlb ctl -c FILE drain db 10.0.0.7:5432 --wait 5m
                                        take a replica out once its sessions are gone

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
    /// Talk to a running ringlb through its admin socket (exit 0 done, 1 refused or failed,
    /// 2 usage).
    Ctl {
        /// The admin socket (default: the admin_socket of the config given with -c).
        #[arg(long, value_name = "PATH", global = true)]
        socket: Option<PathBuf>,
        /// The config file whose admin_socket to use.
        #[arg(short, long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        /// Print the API's JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Print the manual page (roff) made from this command line's definition; `make deb`
    /// installs it as ringlb(8).
    #[command(hide = true)]
    Manpage,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Version, pid, uptime, config, last reload.
    Info,
    /// Every backend of every pool (or of POOL): health, admin state, weight, connections.
    Pools { pool: Option<String> },
    /// No new connections to the backend; open ones continue.
    Drain {
        pool: String,
        backend: SocketAddr,
        /// Return once the backend has no open connections; fail after DURATION (e.g. 30s;
        /// without one, wait as long as it takes).
        #[arg(long, value_name = "DURATION", num_args = 0..=1, value_parser = duration)]
        wait: Option<Option<Duration>>,
    },
    /// As drain, and stop checking it.
    Maint { pool: String, backend: SocketAddr },
    /// Back in: new connections may go to the backend (when its health allows).
    Ready { pool: String, backend: SocketAddr },
    /// Set the backend's weight (0 drains it).
    Weight {
        pool: String,
        backend: SocketAddr,
        #[arg(value_parser = clap::value_parser!(u32).range(0..=i64::from(ringlb::config::MAX_WEIGHT)))]
        weight: u32,
    },
    /// Open connections (of a pool, of a backend).
    Connections {
        #[arg(long)]
        pool: Option<String>,
        #[arg(long)]
        backend: Option<SocketAddr>,
        /// At most this many (default 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Reset every open connection to the backend, both sides.
    ShutdownSessions { pool: String, backend: SocketAddr },
    /// Reload the config file (as SIGHUP) and say what changed.
    Reload,
}

fn duration(text: &str) -> Result<Duration, String> {
    ringlb::config::parse_duration(text)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init();
    let code = match cli.command {
        Command::Check { config: path } => match Config::load(&path) {
            Ok(config) => {
                for warning in &config.warnings {
                    eprintln!("warning: {warning}");
                }
                for (name, why) in unresolved_names(&config) {
                    eprintln!(
                        "warning: {name} does not resolve now: {why} (its pool starts without it and it comes in once it resolves)"
                    );
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
        Command::Manpage => manpage(),
        Command::Ctl { socket, config, json, command } => ctl(socket, config.as_deref(), json, command),
    };
    // Every line logged is written before the process exits (the workers' last connection
    // lines, the final counters).
    logger::finish(std::time::Duration::from_secs(2));
    code
}

/// ringlb(8), from the clap definition (clap_mangen): synopsis, subcommands, examples and
/// signals.
fn manpage() -> ExitCode {
    use clap::CommandFactory;
    let man = clap_mangen::Man::new(Cli::command()).section("8");
    let mut out = Vec::new();
    match man.render(&mut out).and_then(|()| std::io::Write::write_all(&mut std::io::stdout(), &out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The backend names of `config` that do not resolve now (a warning for `ringlb check`).
fn unresolved_names(config: &Config) -> Vec<(String, String)> {
    if !ringlb::control::dns::Names::any(config) {
        return Vec::new();
    }
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(ringlb::control::dns::unresolved(config)),
        Err(e) => vec![("the backend names".into(), format!("cannot start a resolver: {e}"))],
    }
}

fn ctl(socket: Option<PathBuf>, config: Option<&std::path::Path>, json: bool, command: CtlCommand) -> ExitCode {
    let socket = match ctl::socket_path(socket, config) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let state = |pool, backend, state| Action::State { pool, backend, state, wait: None };
    let action = match command {
        CtlCommand::Info => Action::Info,
        CtlCommand::Pools { pool } => Action::Pools(pool),
        CtlCommand::Drain { pool, backend, wait } => Action::State { pool, backend, state: "drain", wait },
        CtlCommand::Maint { pool, backend } => state(pool, backend, "maint"),
        CtlCommand::Ready { pool, backend } => state(pool, backend, "ready"),
        CtlCommand::Weight { pool, backend, weight } => Action::Weight { pool, backend, weight },
        CtlCommand::Connections { pool, backend, limit } => Action::Connections { pool, backend, limit },
        CtlCommand::ShutdownSessions { pool, backend } => Action::ShutdownSessions { pool, backend },
        CtlCommand::Reload => Action::Reload,
    };
    match ctl::run(&socket, &action, json) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(ctl::CtlError::Refused { body, message, .. }) if json => {
            println!("{}", serde_json::to_string_pretty(&body).unwrap_or(message));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
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
    // The log format from here on (an error reading the config is written as text).
    connlog::configure(config.connection_log, config.log_format == ringlb::config::LogFormat::Json);
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
    // Socket activation: listeners whose address systemd passed a socket for use it.
    let mut activated = match Activated::from_env() {
        Ok(activated) => activated,
        Err(e) => {
            error!("socket activation: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: no other thread runs yet. The passed sockets are this process's; a process an
    // upgrade starts is handed them by this one.
    unsafe {
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let server = match Server::start_from_file(&config, path, inherited.as_mut(), Some(&mut activated)) {
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
    for address in activated.unused() {
        log::warn!("socket activation: no listener binds {address}, so the socket systemd passed for it is not used");
    }
    let mut notifier = Notifier::from_env();
    if let Some(inherited) = inherited {
        info!("upgrade: took over {handed} listening sockets from the running process; telling it to drain");
        // The old process tells systemd this one is the main process (MAINPID=).
        if let Err(e) = inherited.ready() {
            log::warn!("upgrade: cannot tell the old process this one serves: {e} (it may have exited)");
        }
    } else {
        notifier.ready(server.shared());
    }
    match server.serve_until_stopped(&signals, invocation.as_ref(), &mut notifier) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
