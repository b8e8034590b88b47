//! The file as written: serde structs that mirror the TOML, with spans for error lines.
//!
//! Numbers are read as `i64` and durations and addresses as strings, so that a zero weight or a
//! bad address reaches [`super::validate`], which can say what would be valid.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub workers: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub drain_timeout: Option<Spanned<String>>,
    pub metrics_bind: Option<Spanned<String>>,
    pub relay: Option<Spanned<String>>,
    pub spread: Option<Spanned<String>>,
    pub pipe_size: Option<Spanned<i64>>,
    pub admin_socket: Option<Spanned<String>>,
    pub connection_log: Option<Spanned<bool>>,
    pub log_format: Option<Spanned<String>>,
    pub dns: Option<Spanned<RawDns>>,
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    #[serde(default)]
    pub listeners: BTreeMap<String, Spanned<RawListener>>,
    #[serde(default)]
    pub pools: BTreeMap<String, Spanned<RawPool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub servers: Option<Spanned<Vec<Spanned<String>>>>,
    pub refresh: Option<Spanned<String>>,
    pub hold: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub bind: Spanned<String>,
    pub pool: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub accept_proxy: Option<Spanned<bool>>,
    pub proxy_from: Option<Spanned<Vec<Spanned<String>>>>,
    pub handshake_timeout: Option<Spanned<String>>,
    pub allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub max_conns_per_source: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub sni: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub algorithm: Option<Spanned<String>>,
    pub table_size: Option<Spanned<i64>>,
    pub hash_key: Option<Spanned<String>>,
    pub on_down: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub send_proxy: Option<Spanned<String>>,
    pub queue_timeout: Option<Spanned<String>>,
    pub backends: Spanned<Vec<Spanned<RawBackend>>>,
    pub health: Option<Spanned<RawHealth>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub enabled: Option<Spanned<bool>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub send: Option<Spanned<String>>,
    pub expect: Option<Spanned<String>>,
    pub port: Option<Spanned<i64>>,
    pub protocol: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub database: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: Option<Spanned<String>>,
    pub srv: Option<Spanned<String>>,
    pub weight: Option<Spanned<i64>>,
    pub max_conns: Option<Spanned<i64>>,
}
