//! Admission: what a listener requires of a connection before a backend is chosen, and the
//! parsers of the client bytes that decide it.
//!
//! - [`acl`]: `allow`/`deny` CIDR lists (and `proxy_from`), checked on the client address.
//! - [`proxy_protocol`]: PROXY protocol v1/v2, parsed from clients and written to backends.
//! - [`tls`]: the server name read from a TLS ClientHello (SNI routing), without terminating TLS.
//! - [`sources`]: `max_conns_per_source`, counted over all workers.
//! - [`Admission`] (this file): the decision from the bytes read so far: read more, route to a
//!   pool, or reject with a reason.
//!
//! With `accept_proxy` the connection must start with a PROXY header (v1 or v2); with SNI
//! routes, a TLS ClientHello follows (after the header, if any) and its server name picks the
//! pool. Pure functions of the bytes: the worker reads, this decides, and tests need no ring.

use std::fmt;
use std::net::SocketAddr;

pub mod acl;
pub mod proxy_protocol;
pub mod sources;
pub mod tls;

use proxy_protocol::{ParseError, Parsed};
use tls::{Hello, HelloError, SniRoutes};

/// A listener's routing requirements, as a worker holds them.
#[derive(Debug, Clone)]
pub struct Admission {
    pub accept_proxy: bool,
    pub sni: SniRoutes,
    /// Where connections go without an SNI route (or always, without SNI routes).
    pub default_pool: Option<usize>,
}

/// The outcome of looking at the bytes read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    NeedMore,
    Route {
        pool: usize,
        /// Bytes of incoming PROXY header, not passed on.
        skip: usize,
        /// The client and the address it connected to, from the PROXY header, when it gave them.
        carried: Option<(SocketAddr, SocketAddr)>,
        /// The TLS server name the ClientHello carried, when the listener routes by it.
        server_name: Option<String>,
    },
    Reject(Reason),
}

/// Why a connection was closed before routing; logged and counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    ProxyHeader(ParseError),
    ClientHello(HelloError),
    NotTls,
    NoServerName,
    NoRoute(String),
    /// The buffer is full and neither the header nor the ClientHello is complete.
    TooLong,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::ProxyHeader(e) => write!(f, "{e}"),
            Reason::ClientHello(e) => write!(f, "{e}"),
            Reason::NotTls => write!(f, "not TLS, and the listener has no default pool"),
            Reason::NoServerName => write!(f, "no server name, and the listener has no default pool"),
            Reason::NoRoute(name) => {
                write!(f, "no route for server name {name:?}, and the listener has no default pool")
            }
            Reason::TooLong => write!(f, "handshake larger than the listener reads"),
        }
    }
}

impl Admission {
    /// Whether connections must be read from before they can be routed.
    pub fn reads_first(&self) -> bool {
        self.accept_proxy || !self.sni.is_empty()
    }

    /// How many client bytes a connection may need to read before it can be routed.
    pub fn read_capacity(&self) -> usize {
        let mut capacity = 0;
        if self.accept_proxy {
            capacity += proxy_protocol::MAX_HEADER;
        }
        if !self.sni.is_empty() {
            capacity += tls::MAX_CLIENT_HELLO;
        }
        capacity
    }

    /// Decides from the bytes read so far; `full` says the buffer has no room for more.
    pub fn examine(&self, received: &[u8], full: bool) -> Step {
        let (skip, carried) = if self.accept_proxy {
            match proxy_protocol::parse(received) {
                Ok(Parsed::Incomplete) => return if full { Step::Reject(Reason::TooLong) } else { Step::NeedMore },
                Ok(Parsed::Complete(header)) => (header.len, header.addresses),
                Err(e) => return Step::Reject(Reason::ProxyHeader(e)),
            }
        } else {
            (0, None)
        };
        let (pool, server_name) = if self.sni.is_empty() {
            (self.default_pool, None)
        } else {
            let route = match tls::read_client_hello(&received[skip..]) {
                Ok(Hello::Incomplete) => return if full { Step::Reject(Reason::TooLong) } else { Step::NeedMore },
                Ok(Hello::NotTls) => self.default_pool.ok_or(Reason::NotTls).map(|p| (p, None)),
                Ok(Hello::Complete { server_name: None }) => {
                    self.default_pool.ok_or(Reason::NoServerName).map(|p| (p, None))
                }
                Ok(Hello::Complete { server_name: Some(name) }) => match self.sni.route(&name).or(self.default_pool) {
                    Some(pool) => Ok((pool, Some(name))),
                    None => Err(Reason::NoRoute(name)),
                },
                Err(e) => Err(Reason::ClientHello(e)),
            };
            match route {
                Ok((pool, name)) => (Some(pool), name),
                Err(reason) => return Step::Reject(reason),
            }
        };
        match pool {
            Some(pool) => Step::Route { pool, skip, carried, server_name },
            // Config validation requires a default pool without SNI routes.
            None => Step::Reject(Reason::NotTls),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::proxy_protocol::{Version, encode};
    use crate::admission::tls::tests::{client_hello, records};

    fn routes() -> SniRoutes {
        let mut routes = SniRoutes::default();
        routes.add("db.example.com", 1).unwrap();
        routes.add("*.example.com", 2).unwrap();
        routes
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn plain_listener_routes_at_once() {
        let a = Admission { accept_proxy: false, sni: SniRoutes::default(), default_pool: Some(0) };
        assert!(!a.reads_first());
        assert_eq!(a.examine(b"", false), Step::Route { pool: 0, skip: 0, carried: None, server_name: None });
    }

    #[test]
    fn proxy_header_then_bytes() {
        let a = Admission { accept_proxy: true, sni: SniRoutes::default(), default_pool: Some(3) };
        let header = encode(Version::V2, addr("203.0.113.5:4000"), addr("10.0.0.1:5432"));
        let mut bytes = header.as_bytes().to_vec();
        assert_eq!(a.examine(&bytes[..10], false), Step::NeedMore);
        assert_eq!(a.examine(&bytes[..10], true), Step::Reject(Reason::TooLong));
        bytes.extend_from_slice(b"startup message");
        assert_eq!(
            a.examine(&bytes, false),
            Step::Route {
                pool: 3,
                skip: 28,
                carried: Some((addr("203.0.113.5:4000"), addr("10.0.0.1:5432"))),
                server_name: None
            }
        );
        assert_eq!(a.examine(b"GET / HTTP/1.1\r\n", false), Step::Reject(Reason::ProxyHeader(ParseError::NotProxy)));
    }

    #[test]
    fn sni_routes_exact_wildcard_default_or_rejects() {
        let with_default = Admission { accept_proxy: false, sni: routes(), default_pool: Some(0) };
        let strict = Admission { accept_proxy: false, sni: routes(), default_pool: None };
        let hello = |name| client_hello(Some(name), 0);
        assert_eq!(
            with_default.examine(&hello("db.example.com"), false),
            Step::Route { pool: 1, skip: 0, carried: None, server_name: Some("db.example.com".into()) }
        );
        assert_eq!(
            with_default.examine(&hello("api.example.com"), false),
            Step::Route { pool: 2, skip: 0, carried: None, server_name: Some("api.example.com".into()) }
        );
        assert_eq!(
            with_default.examine(&hello("other.org"), false),
            Step::Route { pool: 0, skip: 0, carried: None, server_name: Some("other.org".into()) }
        );
        assert_eq!(strict.examine(&hello("other.org"), false), Step::Reject(Reason::NoRoute("other.org".into())));
        assert_eq!(
            with_default.examine(&client_hello(None, 0), false),
            Step::Route { pool: 0, skip: 0, carried: None, server_name: None }
        );
        assert_eq!(strict.examine(&client_hello(None, 0), false), Step::Reject(Reason::NoServerName));
        assert_eq!(
            with_default.examine(b"SSH-2.0-OpenSSH\r\n", false),
            Step::Route { pool: 0, skip: 0, carried: None, server_name: None }
        );
        assert_eq!(strict.examine(b"SSH-2.0-OpenSSH\r\n", false), Step::Reject(Reason::NotTls));
        let partial = hello("db.example.com");
        assert_eq!(strict.examine(&partial[..40], false), Step::NeedMore);
        assert_eq!(strict.examine(&partial[..40], true), Step::Reject(Reason::TooLong));
    }

    #[test]
    fn proxy_header_before_a_fragmented_client_hello() {
        let a = Admission { accept_proxy: true, sni: routes(), default_pool: None };
        let mut bytes = encode(Version::V1, addr("192.0.2.9:1234"), addr("192.0.2.1:443")).as_bytes().to_vec();
        let skip = bytes.len();
        let message: Vec<u8> = client_hello(Some("db.example.com"), 500)[5..].to_vec();
        bytes.extend_from_slice(&records(&message, 64));
        for cut in skip..bytes.len() {
            assert_eq!(a.examine(&bytes[..cut], false), Step::NeedMore, "cut {cut}");
        }
        assert_eq!(
            a.examine(&bytes, false),
            Step::Route {
                pool: 1,
                skip,
                carried: Some((addr("192.0.2.9:1234"), addr("192.0.2.1:443"))),
                server_name: Some("db.example.com".into())
            }
        );
        assert_eq!(a.read_capacity(), proxy_protocol::MAX_HEADER + tls::MAX_CLIENT_HELLO);
    }
}
