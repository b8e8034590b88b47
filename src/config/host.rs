//! Checks of a validated config against this host, which `ringlb check` runs as `ringlb run`
//! does: a listener address that is not one of this host's, a port below 1024 this process
//! may not bind, and a backend that is one of ringlb's own listeners through an address that
//! is this host's (the loopback cases are caught while validating, on any host).
//!
//! The probes bind sockets without listening, so they never take a connection, and bind port
//! 0 except to ask about a privileged port, so a running ringlb's ports do not get in the way.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Socket, Type};

use super::{Config, ConfigError, loops_back};

/// Binds a throwaway socket to `addr` without listening.
fn probe(addr: SocketAddr) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// Whether `ip` is an address of this host (binding to it works).
fn is_local(ip: IpAddr) -> bool {
    probe(SocketAddr::new(ip, 0)).is_ok()
}

/// Whether connecting to `backend` reaches the listener bound to `bind` on this host: the
/// cases [`loops_back`] sees on any host, and an address of this host on the port of a
/// wildcard listener.
pub fn reaches_listener(bind: SocketAddr, backend: SocketAddr) -> bool {
    loops_back(bind, backend)
        || (bind.ip().is_unspecified()
            && bind.port() == backend.port()
            && bind.is_ipv4() == backend.is_ipv4()
            && is_local(backend.ip()))
}

pub fn check(config: &Config) -> Result<(), ConfigError> {
    let invalid = |line: usize, key: String, message: String| ConfigError::Invalid {
        path: config.path.clone(),
        line,
        key,
        message,
    };
    for listener in &config.listeners {
        let key = format!("listeners.{}.bind", listener.name);
        let ip = listener.bind.ip();
        if !ip.is_unspecified() && !is_local(ip) {
            return Err(invalid(
                listener.line,
                key,
                format!("{ip} is not an address of this host; use one it has (see `ip address`), or 0.0.0.0 for all"),
            ));
        }
        let port = listener.bind.port();
        if (1..1024).contains(&port)
            && let Err(e) = probe(listener.bind)
            && e.raw_os_error() == Some(libc::EACCES)
        {
            return Err(invalid(
                listener.line,
                key,
                format!("binding port {port} needs root or CAP_NET_BIND_SERVICE, which this process does not have"),
            ));
        }
        if !ip.is_unspecified() {
            continue;
        }
        for pool in &config.pools {
            for (i, backend) in pool.backends.iter().enumerate() {
                if reaches_listener(listener.bind, backend.address) {
                    return Err(invalid(
                        backend.line,
                        format!("pools.{}.backends[{i}].address", pool.name),
                        format!(
                            "{} is this host, where listener {:?} takes port {port} on every address: connections would loop back into ringlb",
                            backend.address, listener.name
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}
