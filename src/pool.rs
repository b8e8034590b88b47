//! Pools of backends as the workers see them: an immutable [`Snapshot`] built from the
//! configuration and published to every worker, which only ever reads it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::SockAddr;

use crate::config::{Algorithm, Config};

/// One backend: where it is and how much traffic it should get.
#[derive(Debug)]
pub struct Backend {
    pub address: SocketAddr,
    pub weight: u32,
    /// The address in the form `connect` takes, built once.
    pub sockaddr: SockAddr,
}

/// One pool of backends.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub algorithm: Algorithm,
    pub connect_timeout: Duration,
    pub backends: Vec<Backend>,
}

/// Everything a worker needs to choose and reach a backend. Replaced as a whole, never
/// modified: a worker holding an `Arc<Snapshot>` sees a consistent view.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases with every snapshot published.
    pub generation: u64,
    /// Indexed like [`Config::pools`].
    pub pools: Vec<Pool>,
}

impl Snapshot {
    pub fn from_config(config: &Config, generation: u64) -> Arc<Snapshot> {
        let pools = config
            .pools
            .iter()
            .map(|pool| Pool {
                name: pool.name.clone(),
                algorithm: pool.algorithm,
                connect_timeout: pool.connect_timeout,
                backends: pool
                    .backends
                    .iter()
                    .map(|b| Backend {
                        address: b.address,
                        weight: b.weight.get(),
                        sockaddr: SockAddr::from(b.address),
                    })
                    .collect(),
            })
            .collect();
        Arc::new(Snapshot { generation, pools })
    }
}
