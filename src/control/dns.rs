//! Backends by name. Every name a pool lists (`address = "host:port"`: each A and AAAA answer;
//! `srv = "_service._proto.name"`: each SRV target's addresses, with its port, weight and
//! priority) is looked up by a task on the control thread's runtime with hickory-resolver,
//! never on a worker. A lookup's answer becomes backends of the pool (after those written as
//! addresses, an address given twice taken once), published as a reload publishes a config:
//! new addresses get health checks and start as configured, removed ones take no new
//! connections and their open connections finish.
//!
//! A name is looked up again after its answer's TTL, at least 1 s and at most `dns.refresh`
//! later, and every second while lookups fail. A failed lookup (timeout, SERVFAIL, NXDOMAIN,
//! an empty answer) keeps the last good answer until `dns.hold` has passed since it came,
//! then the name has no backends until it resolves again. Each change of a name's state
//! (resolves, fails, holds, emptied) is logged once.
//!
//! An answer is not trusted further than a config would be: an address that cannot be
//! connected to (0.0.0.0 or ::, port 0, multicast, broadcast) or that reaches one of ringlb's
//! own listeners (the same address, loopback or an address of this host on the port of a
//! wildcard listener) is left out, and a name gives at most [`MAX_ADDRESSES`] backends; what
//! is left out is logged when it changes. The targets of an SRV answer are looked up at the
//! same time, and one that does not resolve is left out while the others serve (the lookup
//! fails only when none resolves).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use log::{info, warn};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{
    BackendConfig, Config, DnsConfig, MAX_WEIGHT, MIN_DNS_REFRESH, NameConfig, NameKind, reaches_listener,
    unconnectable,
};

/// How long one lookup (with its retries) may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an SRV target's addresses may take (the targets are looked up together, after
/// the SRV answer, within [`LOOKUP_TIMEOUT`]).
const TARGET_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a start waits for the first answers, so that a pool given by name has its backends
/// before the first connection (and a binary upgrade's new process before it takes over).
pub const FIRST_ANSWERS: Duration = Duration::from_secs(3);
/// The most backends one name gives (the first ones of its answer): a few thousand records fit
/// in one answer over TCP, and each backend is health-checked.
pub const MAX_ADDRESSES: usize = 256;

/// One address a name resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub address: SocketAddr,
    /// The SRV record's weight (1 to `MAX_WEIGHT`); `None` for a host name, which takes its
    /// entry's weight.
    pub weight: Option<u32>,
    /// The SRV record's priority; 0 for a host name.
    pub priority: u16,
}

/// A name as one pool lists it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameKey {
    pub pool: String,
    pub kind: NameKind,
}

/// One lookup's outcome, as a name's task sends it to the control loop.
#[derive(Debug)]
pub struct Looked {
    pub key: NameKey,
    pub at: SystemTime,
    /// The task that looked (a reload may have replaced it since).
    pub task: u64,
    pub outcome: Result<Answer, String>,
}

/// What the metrics page and the admin API show of a name.
#[derive(Debug, Clone, PartialEq)]
pub struct NameStatus {
    pub pool: String,
    pub name: String,
    /// The addresses in effect.
    pub addresses: Vec<SocketAddr>,
    /// The last lookup: when, and `Ok(n addresses)` or why it failed.
    pub last: Option<(SystemTime, Result<usize, String>)>,
    pub lookups_ok: u64,
    pub lookups_failed: u64,
    /// Whether the addresses in effect are a held answer (lookups fail since).
    pub holding: bool,
}

/// A name's state on the control thread.
struct Entry {
    task: tokio::task::JoinHandle<()>,
    id: u64,
    in_effect: Vec<Found>,
    last_good: Option<Instant>,
    status: NameStatus,
    /// What of the last answer was left out, and why (logged when it changes).
    left_out: Vec<String>,
}

/// Every name of the config in effect, and their tasks.
pub struct Names {
    dns: DnsConfig,
    resolver: Option<Arc<TokioResolver>>,
    entries: HashMap<NameKey, Entry>,
    results: UnboundedSender<Looked>,
    next_task: u64,
    /// Where ringlb's own listeners are bound: an answer naming one of them is left out (it
    /// would loop back into ringlb).
    listeners: Vec<SocketAddr>,
}

impl Names {
    /// Starts a task for every name of `config`; their outcomes go to `results`.
    pub fn start(config: &Config, results: UnboundedSender<Looked>) -> Names {
        let mut names = Names {
            dns: config.dns.clone(),
            resolver: None,
            entries: HashMap::new(),
            results,
            next_task: 0,
            listeners: Vec::new(),
        };
        names.reconfigure(config);
        names
    }

    /// Whether `config` lists any name.
    pub fn any(config: &Config) -> bool {
        config.pools.iter().any(|p| !p.names.is_empty())
    }

    /// Follows the names of `config`: new ones get a task, gone ones lose theirs (and their
    /// addresses); with another `[dns]` table every name is looked up again with it.
    pub fn reconfigure(&mut self, config: &Config) {
        self.listeners = config.listeners.iter().map(|l| l.bind).collect();
        if config.dns != self.dns {
            self.dns = config.dns.clone();
            self.resolver = None;
            for entry in self.entries.values() {
                entry.task.abort();
            }
            let ids: Vec<NameKey> = self.entries.keys().cloned().collect();
            for key in ids {
                let id = self.spawn(&key);
                if let Some(entry) = self.entries.get_mut(&key) {
                    entry.task = id.0;
                    entry.id = id.1;
                }
            }
        }
        let wanted: Vec<NameKey> = config
            .pools
            .iter()
            .flat_map(|p| p.names.iter().map(|n| NameKey { pool: p.name.clone(), kind: n.kind.clone() }))
            .collect();
        self.entries.retain(|key, entry| {
            let keep = wanted.contains(key);
            if !keep {
                entry.task.abort();
            }
            keep
        });
        for key in wanted {
            if self.entries.contains_key(&key) {
                continue;
            }
            let (task, id) = self.spawn(&key);
            let status = NameStatus {
                pool: key.pool.clone(),
                name: key.kind.label(),
                addresses: Vec::new(),
                last: None,
                lookups_ok: 0,
                lookups_failed: 0,
                holding: false,
            };
            let entry = Entry { task, id, in_effect: Vec::new(), last_good: None, status, left_out: Vec::new() };
            self.entries.insert(key, entry);
        }
    }

    fn spawn(&mut self, key: &NameKey) -> (tokio::task::JoinHandle<()>, u64) {
        self.next_task += 1;
        let id = self.next_task;
        let resolver = match &self.resolver {
            Some(resolver) => Ok(Arc::clone(resolver)),
            None => build_resolver(&self.dns).map(Arc::new),
        };
        if let Ok(resolver) = &resolver {
            self.resolver = Some(Arc::clone(resolver));
        }
        let task = tokio::task::spawn_local(follow(resolver, key.clone(), id, self.dns.refresh, self.results.clone()));
        (task, id)
    }

    /// Takes in one lookup's outcome; true when the addresses in effect for its name changed.
    pub fn record(&mut self, looked: Looked) -> bool {
        let hold = self.dns.hold;
        let Some(entry) = self.entries.get_mut(&looked.key) else { return false };
        if entry.id != looked.task {
            return false;
        }
        let label = looked.key.kind.label();
        let pool = &looked.key.pool;
        let before = entry.in_effect.clone();
        let was_holding = entry.status.holding;
        let was_failing = matches!(entry.status.last, Some((_, Err(_))));
        let listeners = &self.listeners;
        match looked.outcome {
            Ok(answer) => {
                let (found, mut left_out) = usable(answer.found, listeners);
                left_out.extend(
                    answer.unresolved.iter().map(|why| format!("an SRV target that does not resolve, {why}: left out")),
                );
                if left_out != entry.left_out {
                    for why in &left_out {
                        warn!("dns: pool {pool}: {label} gives {why}");
                    }
                }
                entry.left_out = left_out;
                entry.status.lookups_ok += 1;
                entry.status.last = Some((looked.at, Ok(found.len())));
                entry.last_good = Some(Instant::now());
                entry.in_effect = found;
                entry.status.holding = false;
                if was_failing || entry.status.lookups_ok == 1 {
                    info!("dns: pool {pool}: {label} resolves to {}", addresses(&entry.in_effect));
                }
            }
            Err(why) => {
                entry.status.lookups_failed += 1;
                let same_failure = matches!(&entry.status.last, Some((_, Err(w))) if *w == why);
                entry.status.last = Some((looked.at, Err(why.clone())));
                let held = entry.last_good.is_some_and(|at| at.elapsed() < hold);
                if !held && !entry.in_effect.is_empty() {
                    warn!(
                        "dns: pool {pool}: {label}: {why}; the last answer is older than hold ({hold:?}): its {} addresses take no new connections",
                        entry.in_effect.len()
                    );
                    entry.in_effect.clear();
                } else if held && !was_holding {
                    warn!("dns: pool {pool}: {label}: {why}; keeping the last answer for up to {hold:?}");
                } else if !same_failure && !held {
                    warn!(
                        "dns: pool {pool}: {label}: {why}; no backends from it until it resolves (retrying every second)"
                    );
                }
                entry.status.holding = held && !entry.in_effect.is_empty();
            }
        }
        entry.status.addresses = entry.in_effect.iter().map(|f| f.address).collect();
        let mut now: Vec<Found> = entry.in_effect.clone();
        let mut then = before;
        now.sort_by_key(|f| (f.address, f.priority, f.weight));
        then.sort_by_key(|f| (f.address, f.priority, f.weight));
        now != then
    }

    /// Whether every name has had a lookup.
    pub fn all_looked_up(&self) -> bool {
        self.entries.values().all(|e| e.status.last.is_some())
    }

    /// `file` with the backends its names resolve to now.
    pub fn expand(&self, file: &Config) -> Config {
        let mut config = file.clone();
        for pool in &mut config.pools {
            for (i, name) in pool.names.iter().enumerate() {
                let key = NameKey { pool: pool.name.clone(), kind: name.kind.clone() };
                let Some(entry) = self.entries.get(&key) else { continue };
                for found in &entry.in_effect {
                    if pool.backends.iter().any(|b| b.address == found.address) {
                        continue;
                    }
                    pool.backends.push(backend(name, i, found));
                }
            }
        }
        config
    }

    /// What the metrics page and the admin API show, in config order.
    pub fn status(&self, config: &Config) -> Vec<NameStatus> {
        config
            .pools
            .iter()
            .flat_map(|p| p.names.iter().map(|n| NameKey { pool: p.name.clone(), kind: n.kind.clone() }))
            .filter_map(|key| self.entries.get(&key).map(|e| e.status.clone()))
            .collect()
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        for entry in self.entries.values() {
            entry.task.abort();
        }
    }
}

fn backend(name: &NameConfig, index: usize, found: &Found) -> BackendConfig {
    let mut backend = BackendConfig::new(found.address, found.weight.unwrap_or(name.weight.get()));
    backend.line = name.line;
    backend.max_conns = name.max_conns;
    backend.origin = u16::try_from(index).ok();
    backend.priority = found.priority;
    backend
}

fn addresses(found: &[Found]) -> String {
    if found.is_empty() {
        return "no address".into();
    }
    found.iter().map(|f| f.address.to_string()).collect::<Vec<_>>().join(", ")
}

/// The addresses of `found` that can be backends, and what was left out and why: addresses
/// nothing can connect to, ringlb's own listeners, and those past [`MAX_ADDRESSES`].
fn usable(found: Vec<Found>, listeners: &[SocketAddr]) -> (Vec<Found>, Vec<String>) {
    let mut kept = Vec::new();
    let (mut unusable, mut looping, mut past) = (Vec::new(), Vec::new(), 0);
    for f in found {
        if unconnectable(f.address) {
            unusable.push(f.address);
        } else if listeners.iter().any(|&bind| reaches_listener(bind, f.address)) {
            looping.push(f.address);
        } else if kept.len() == MAX_ADDRESSES {
            past += 1;
        } else {
            kept.push(f);
        }
    }
    let list = |a: &[SocketAddr]| a.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let mut left_out = Vec::new();
    if !unusable.is_empty() {
        left_out.push(format!("{}, which cannot be connected to: left out", list(&unusable)));
    }
    if !looping.is_empty() {
        left_out.push(format!(
            "{}, ringlb's own listener: left out (connections would loop back into ringlb)",
            list(&looping)
        ));
    }
    if past > 0 {
        left_out.push(format!("{past} addresses more than the {MAX_ADDRESSES} a name may give: left out"));
    }
    (kept, left_out)
}

/// A resolver for the `[dns]` table: its servers, or those of /etc/resolv.conf. No cache (a
/// name's task decides when to ask again) and no hosts file for listed servers.
pub fn build_resolver(dns: &DnsConfig) -> Result<TokioResolver, String> {
    let mut builder = if dns.servers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("cannot read /etc/resolv.conf: {e}"))?
    } else {
        let servers = dns
            .servers
            .iter()
            .map(|server| {
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut config.connections {
                    connection.port = server.port();
                }
                config
            })
            .collect();
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        );
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        builder
    };
    let options = builder.options_mut();
    options.cache_size = 0;
    options.timeout = Duration::from_secs(1);
    options.attempts = 2;
    builder.build().map_err(|e| format!("cannot set up the resolver: {e}"))
}

/// A name's task: looks it up, sends the outcome, waits (the TTL, between 1 s and `refresh`;
/// 1 s after a failure), again.
async fn follow(
    resolver: Result<Arc<TokioResolver>, String>,
    key: NameKey,
    task: u64,
    refresh: Duration,
    results: UnboundedSender<Looked>,
) {
    loop {
        let at = SystemTime::now();
        let (outcome, wait) = match &resolver {
            Ok(resolver) => match tokio::time::timeout(LOOKUP_TIMEOUT, resolve(resolver, &key.kind)).await {
                Ok(Ok(answer)) => {
                    let wait = answer.ttl.clamp(MIN_DNS_REFRESH, refresh.max(MIN_DNS_REFRESH));
                    (Ok(answer), wait)
                }
                Ok(Err(why)) => (Err(why), MIN_DNS_REFRESH),
                Err(_) => (Err(format!("no answer within {LOOKUP_TIMEOUT:?}")), MIN_DNS_REFRESH),
            },
            Err(why) => (Err(why.clone()), MIN_DNS_REFRESH),
        };
        if results.send(Looked { key: key.clone(), at, task, outcome }).is_err() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// One lookup's answer.
#[derive(Debug)]
pub struct Answer {
    pub found: Vec<Found>,
    /// The shortest TTL of the records used.
    pub ttl: Duration,
    /// Why each SRV target that did not resolve did not ("TARGET: WHY"; left out, the others
    /// serve).
    pub unresolved: Vec<String>,
}

/// Looks `kind` up once.
pub async fn resolve(resolver: &TokioResolver, kind: &NameKind) -> Result<Answer, String> {
    match kind {
        NameKind::Host { host, port } => {
            let (ips, ttl) = addresses_of(resolver, host, None).await?;
            let found =
                ips.into_iter().map(|ip| Found { address: SocketAddr::new(ip, *port), weight: None, priority: 0 });
            Ok(Answer { found: found.collect(), ttl, unresolved: Vec::new() })
        }
        NameKind::Srv { name } => {
            let lookup = resolver.lookup(name.as_str(), RecordType::SRV).await.map_err(|e| failure(&e))?;
            let mut ttl = shortest_ttl(&lookup);
            // Each record with its target's name ("." names no target).
            let srvs: Vec<_> = lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::SRV(srv) => Some((srv, srv.target.to_ascii())),
                    _ => None,
                })
                .filter(|(_, target)| target != ".")
                .collect();
            // Every target at once: a slow one does not hold the others up.
            let additionals = &lookup;
            let looked = join_all(srvs.iter().map(|(_, target)| async move {
                tokio::time::timeout(TARGET_TIMEOUT, addresses_of(resolver, target, Some(additionals)))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!("{}: no answer within {TARGET_TIMEOUT:?}", target.trim_end_matches('.')))
                    })
            }))
            .await;
            let (mut found, mut unresolved) = (Vec::new(), Vec::new());
            for ((srv, _), outcome) in srvs.iter().zip(looked) {
                let (ips, target_ttl) = match outcome {
                    Ok(answer) => answer,
                    Err(why) => {
                        if !unresolved.contains(&why) {
                            unresolved.push(why);
                        }
                        continue;
                    }
                };
                ttl = ttl.min(target_ttl);
                let weight = u32::from(srv.weight).clamp(1, MAX_WEIGHT);
                for ip in ips {
                    let address = SocketAddr::new(ip, srv.port);
                    if !found.iter().any(|f: &Found| f.address == address) {
                        found.push(Found { address, weight: Some(weight), priority: srv.priority });
                    }
                }
            }
            if found.is_empty() {
                return Err(match unresolved.is_empty() {
                    true => "the SRV answer names no reachable target".into(),
                    false => format!("no SRV target resolves ({})", unresolved.join("; ")),
                });
            }
            Ok(Answer { found, ttl, unresolved })
        }
    }
}

/// The A and AAAA addresses of `host`: from the additional records of `srv` if it carries
/// them, else asked for. Fails only if neither kind has an answer.
async fn addresses_of(
    resolver: &TokioResolver,
    host: &str,
    srv: Option<&Lookup>,
) -> Result<(Vec<IpAddr>, Duration), String> {
    if let Some(srv) = srv {
        let wanted = host.trim_end_matches('.');
        let ips: Vec<(IpAddr, u32)> = srv
            .additionals()
            .iter()
            .filter(|r| r.name.to_ascii().trim_end_matches('.').eq_ignore_ascii_case(wanted))
            .filter_map(|r| ip_of(&r.data).map(|ip| (ip, r.ttl)))
            .collect();
        if !ips.is_empty() {
            let ttl = ips.iter().map(|&(_, t)| t).min().unwrap_or(0);
            return Ok((ips.into_iter().map(|(ip, _)| ip).collect(), Duration::from_secs(ttl.into())));
        }
    }
    let (v4, v6) = tokio::join!(resolver.lookup(host, RecordType::A), resolver.lookup(host, RecordType::AAAA));
    let mut ips = Vec::new();
    let mut ttl = Duration::MAX;
    let mut errors = Vec::new();
    for outcome in [v4, v6] {
        match outcome {
            Ok(lookup) => {
                ttl = ttl.min(shortest_ttl(&lookup));
                ips.extend(lookup.answers().iter().filter_map(|r| ip_of(&r.data)));
            }
            Err(e) => errors.push(e),
        }
    }
    if ips.is_empty() {
        // A failure that is not "no such record" says more (SERVFAIL, a timeout).
        let worst = errors.iter().find(|e| !is_no_records(e)).or(errors.first());
        let host = host.trim_end_matches('.');
        return Err(worst.map_or_else(|| format!("{host}: an empty answer"), |e| format!("{host}: {}", failure(e))));
    }
    Ok((ips, ttl))
}

fn ip_of(data: &RData) -> Option<IpAddr> {
    match data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    }
}

fn shortest_ttl(lookup: &Lookup) -> Duration {
    let ttl = lookup.answers().iter().map(|r| r.ttl).min().unwrap_or(0);
    Duration::from_secs(ttl.into())
}

fn is_no_records(e: &NetError) -> bool {
    matches!(e, NetError::Dns(DnsError::NoRecordsFound(_)))
}

/// A lookup error as the log and the admin API say it.
fn failure(e: &NetError) -> String {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(none)) if none.response_code == ResponseCode::NoError => {
            "an empty answer".into()
        }
        NetError::Dns(DnsError::NoRecordsFound(none)) => code(none.response_code),
        NetError::Dns(DnsError::ResponseCode(c)) => code(*c),
        NetError::Timeout => "timed out".into(),
        other => other.to_string(),
    }
}

fn code(code: ResponseCode) -> String {
    match code {
        ResponseCode::NXDomain => "NXDOMAIN (no such name)".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("the server answered {other}"),
    }
}

/// Looks every name of `config` up once (for `ringlb check`): the names that do not resolve,
/// and why.
pub async fn unresolved(config: &Config) -> Vec<(String, String)> {
    let resolver = build_resolver(&config.dns);
    let mut out = Vec::new();
    for pool in &config.pools {
        for name in &pool.names {
            let why = match &resolver {
                Err(why) => why.clone(),
                Ok(resolver) => match tokio::time::timeout(LOOKUP_TIMEOUT, resolve(resolver, &name.kind)).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(why)) => why,
                    Err(_) => format!("no answer within {LOOKUP_TIMEOUT:?}"),
                },
            };
            out.push((format!("pools.{}: {} (line {})", pool.name, name.label(), name.line), why));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(address: &str) -> Found {
        Found { address: address.parse().unwrap(), weight: None, priority: 0 }
    }

    fn addresses(found: &[Found]) -> Vec<String> {
        found.iter().map(|f| f.address.to_string()).collect()
    }

    #[test]
    fn addresses_nothing_connects_to_and_ringlbs_own_listeners_are_left_out() {
        let listeners = ["0.0.0.0:5432".parse().unwrap(), "127.0.0.1:6379".parse().unwrap()];
        let answer = [
            "0.0.0.0:5432",
            "[::]:5432",
            "224.0.0.1:5432",
            "255.255.255.255:5432",
            "192.0.2.7:0",
            "127.0.0.9:5432",
            "127.0.0.1:6379",
            "192.0.2.7:5432",
            "[2001:db8::7]:5432",
            "127.0.0.1:6380",
        ];
        let (kept, left_out) = usable(answer.iter().map(|a| found(a)).collect(), &listeners);
        assert_eq!(addresses(&kept), ["192.0.2.7:5432", "[2001:db8::7]:5432", "127.0.0.1:6380"]);
        assert_eq!(
            left_out,
            [
                "0.0.0.0:5432, [::]:5432, 224.0.0.1:5432, 255.255.255.255:5432, 192.0.2.7:0, which cannot be connected to: left out",
                "127.0.0.9:5432, 127.0.0.1:6379, ringlb's own listener: left out (connections would loop back into ringlb)",
            ]
        );
    }

    #[test]
    fn a_name_gives_at_most_max_addresses() {
        let answer: Vec<Found> =
            (0..MAX_ADDRESSES + 44).map(|i| found(&format!("198.51.{}.{}:80", i / 250, 1 + i % 250))).collect();
        let (kept, left_out) = usable(answer.clone(), &[]);
        assert_eq!(kept, answer[..MAX_ADDRESSES]);
        assert_eq!(left_out, [format!("44 addresses more than the {MAX_ADDRESSES} a name may give: left out")]);
        let (kept, left_out) = usable(answer[..MAX_ADDRESSES].to_vec(), &[]);
        assert_eq!((kept.len(), left_out.len()), (MAX_ADDRESSES, 0));
    }
}
