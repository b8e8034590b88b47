//! Following the primary as Patroni's REST API tells it: health checks on the agent's port
//! (`[pools.NAME.health] port`), `GET /primary` answered 200 only by the primary.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// A Patroni-like agent: `GET /primary` is 200 when `primary` is set, else 503; `GET
/// /replica` the other way round. Counts the requests it answered.
struct Agent {
    primary: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn start(addr: SocketAddr, primary: bool) -> Agent {
        let listener = TcpListener::bind(addr).unwrap();
        let agent = Agent {
            primary: Arc::new(AtomicBool::new(primary)),
            answered: Arc::new(AtomicUsize::new(0)),
            paths: Arc::new(Mutex::new(Vec::new())),
        };
        let (role, answered, paths) =
            (Arc::clone(&agent.primary), Arc::clone(&agent.answered), Arc::clone(&agent.paths));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                // The rest of the head, up to the empty line.
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
                let is_primary = role.load(Ordering::SeqCst);
                let ok = match path.as_str() {
                    "/primary" => is_primary,
                    "/replica" => !is_primary,
                    _ => false,
                };
                let status = if ok { "200 OK" } else { "503 Service Unavailable" };
                let body = format!("{{\"role\": \"{}\"}}", if is_primary { "primary" } else { "replica" });
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                paths.lock().unwrap().push(path);
                answered.fetch_add(1, Ordering::SeqCst);
            }
        });
        agent
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A port free at both 127.0.0.`a` and 127.0.0.`b`.
fn port_free_at(a: u8, b: u8) -> u16 {
    loop {
        let probe = TcpListener::bind((ip(a), 0)).unwrap();
        let port = probe.local_addr().unwrap().port();
        if TcpListener::bind((ip(b), port)).is_ok() {
            return port;
        }
    }
}

#[test]
fn the_primary_pool_follows_a_failover_and_cuts_the_old_primarys_sessions() {
    let (db_port, agent_port) = (port_free_at(81, 82), port_free_at(81, 82));
    let backend = |last: u8, name: &'static str| {
        Backend::start_on(SocketAddr::new(ip(last), db_port), identity(name, Arc::new(AtomicUsize::new(0))))
    };
    let (_one, _two) = (backend(81, "one"), backend(82, "two"));
    let agents = [
        Agent::start(SocketAddr::new(ip(81), agent_port), true),
        Agent::start(SocketAddr::new(ip(82), agent_port), false),
    ];
    let config = format!(
        r#"workers = 2
[listeners.primary]
bind = "127.0.0.1:0"
pool = "primary"

[listeners.replicas]
bind = "127.0.0.1:0"
pool = "replicas"

[pools.primary]
backends = [{{ address = "127.0.0.81:{db_port}" }}, {{ address = "127.0.0.82:{db_port}" }}]
on_down = "close"

[pools.primary.health]
port = {agent_port}
send = "GET /primary HTTP/1.0\r\n\r\n"
expect = "HTTP/1.1 200"
interval = "100ms"
rise = 2
fall = 3

[pools.replicas]
backends = [{{ address = "127.0.0.81:{db_port}" }}, {{ address = "127.0.0.82:{db_port}" }}]

[pools.replicas.health]
port = {agent_port}
send = "GET /replica HTTP/1.0\r\n\r\n"
expect = "HTTP/1.1 200"
interval = "100ms"
rise = 2
fall = 3
"#
    );
    let lb = Ringlb::start(&config);
    let (primary, replicas) = (lb.addrs["primary"], lb.addrs["replicas"]);
    let served = |addr: SocketAddr, n: usize| -> Vec<String> {
        (0..n).map(|_| who(&mut connect(addr)).unwrap_or_default()).collect()
    };
    // The checks go to the agent's port, not the database's.
    assert!(Ringlb::eventually(WAIT, || agents[1].answered.load(Ordering::SeqCst) >= 4));
    assert!(agents[0].paths.lock().unwrap().iter().any(|p| p == "/primary"));
    assert!(Ringlb::eventually(WAIT, || served(primary, 6) == vec!["one"; 6]), "{}", lb.log());
    assert!(Ringlb::eventually(WAIT, || served(replicas, 6) == vec!["two"; 6]), "{}", lb.log());
    let mut session = connect(primary);
    assert_eq!(who(&mut session).unwrap(), "one");

    // Failover: two becomes the primary.
    agents[0].primary.store(false, Ordering::SeqCst);
    agents[1].primary.store(true, Ordering::SeqCst);
    // The old primary's session is cut once `fall` checks failed...
    session.set_read_timeout(Some(WAIT)).unwrap();
    let mut byte = [0u8; 1];
    let cut = match session.read(&mut byte) {
        Ok(0) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
        Ok(_) => false,
    };
    assert!(cut, "the old primary's session was not cut:\n{}", lb.log());
    assert!(
        lb.logged(&format!("pool primary: backend 127.0.0.81:{db_port} DOWN after 3 failed checks")),
        "{}",
        lb.log()
    );
    // ... and the new one takes new connections once `rise` checks passed.
    assert!(Ringlb::eventually(WAIT, || served(primary, 6) == vec!["two"; 6]), "{}", lb.log());
    assert!(lb.logged(&format!("pool primary: backend 127.0.0.82:{db_port} UP after 2 passed checks")), "{}", lb.log());
    assert!(Ringlb::eventually(WAIT, || served(replicas, 6) == vec!["one"; 6]), "{}", lb.log());
}
