//! A DNS server for tests, on loopback UDP and TCP, whose answers a test sets and changes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

/// What the server answers for one name.
#[derive(Debug, Clone)]
pub enum Reply {
    /// These addresses (A and AAAA), with this TTL.
    Addresses(Vec<IpAddr>, u32),
    /// SRV records: (priority, weight, port, target), with this TTL; the targets' addresses
    /// come from their own entries (also sent as additional records).
    Srv(Vec<(u16, u16, u16, String)>, u32),
    ServFail,
    NxDomain,
    /// No answer at all (the client times out).
    Silent,
}

#[derive(Default)]
struct State {
    zone: HashMap<String, Reply>,
    /// Queries per lower-case name, without the final dot.
    asked: HashMap<String, u64>,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    /// Starts serving on a free loopback port (the same one for UDP and TCP).
    pub fn start() -> DnsServer {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()) {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        udp.set_read_timeout(Some(std::time::Duration::from_millis(100))).unwrap();
        {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = udp.recv_from(&mut buf) else { continue };
                    if let Some(response) = answer(&state, &buf[..n]) {
                        let _ = udp.send_to(&response, from);
                    }
                }
            });
        }
        {
            let state = Arc::clone(&state);
            thread::spawn(move || {
                for stream in tcp.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    let state = Arc::clone(&state);
                    thread::spawn(move || {
                        let mut len = [0u8; 2];
                        while stream.read_exact(&mut len).is_ok() {
                            let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
                            if stream.read_exact(&mut query).is_err() {
                                return;
                            }
                            let Some(response) = answer(&state, &query) else { continue };
                            let mut framed = (response.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&response);
                            if stream.write_all(&framed).is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
        DnsServer { addr, state, stop }
    }

    /// Sets what `name` answers from now on.
    pub fn set(&self, name: &str, reply: Reply) {
        self.state.lock().unwrap().zone.insert(key(name), reply);
    }

    /// How many queries for `name` came so far.
    pub fn asked(&self, name: &str) -> u64 {
        self.state.lock().unwrap().asked.get(&key(name)).copied().unwrap_or(0)
    }

    /// `[dns]` for a config that asks this server.
    pub fn config(&self, refresh: &str, hold: &str) -> String {
        format!("[dns]\nservers = [\"{}\"]\nrefresh = \"{refresh}\"\nhold = \"{hold}\"\n", self.addr)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The response to `query` as the zone says now; `None` to stay silent.
fn answer(state: &Mutex<State>, query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let question = request.queries.first()?.clone();
    let name = key(&question.name().to_ascii());
    let mut state = state.lock().unwrap();
    *state.asked.entry(name.clone()).or_default() += 1;
    let mut response = Message::new(request.metadata.id, MessageType::Response, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    response.add_query(question.clone());
    let owner = question.name().clone();
    match state.zone.get(&name).cloned() {
        None | Some(Reply::NxDomain) => response.metadata.response_code = ResponseCode::NXDomain,
        Some(Reply::ServFail) => response.metadata.response_code = ResponseCode::ServFail,
        Some(Reply::Silent) => return None,
        Some(Reply::Addresses(ips, ttl)) => {
            for record in address_records(&owner, &ips, ttl, question.query_type()) {
                response.add_answer(record);
            }
        }
        Some(Reply::Srv(targets, ttl)) if question.query_type() == RecordType::SRV => {
            for (priority, weight, port, target) in targets {
                let target_name = Name::from_ascii(format!("{}.", key(&target))).ok()?;
                let srv = SRV::new(priority, weight, port, target_name.clone());
                response.add_answer(Record::from_rdata(owner.clone(), ttl, RData::SRV(srv)));
                if let Some(Reply::Addresses(ips, ttl)) = state.zone.get(&key(&target)) {
                    for kind in [RecordType::A, RecordType::AAAA] {
                        for record in address_records(&target_name, ips, *ttl, kind) {
                            response.add_additional(record);
                        }
                    }
                }
            }
        }
        Some(Reply::Srv(..)) => {}
    }
    response.to_vec().ok()
}

fn address_records(owner: &Name, ips: &[IpAddr], ttl: u32, kind: RecordType) -> Vec<Record> {
    ips.iter()
        .filter_map(|ip| match (ip, kind) {
            (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
            (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|data| Record::from_rdata(owner.clone(), ttl, data))
        .collect()
}
