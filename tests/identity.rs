//! Client identity and TLS passthrough end to end: PROXY protocol both ways, SNI routing with
//! real TLS on both ends, access rules, per-source limits and backend queues.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};

/// A backend that reads until it has seen `marker`, then sends back every byte it got.
fn mirror(marker: &'static [u8]) -> Backend {
    Backend::start(move |mut stream| {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(marker.len()).any(|w| w == marker) {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(&got);
    })
}

/// Two workers on the default spread (each takes its share), so per-source limits and backend
/// queues are tested as counts the workers share.
fn listener_config(listener_extra: &str, backends: &[SocketAddr], pool_extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    format!(
        "workers = 2\nmetrics_bind = \"127.0.0.1:0\"\n[listeners.test]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n{listener_extra}\n\
         [pools.p]\nbackends = [{}]\n{pool_extra}\n[pools.p.health]\nenabled = false\n",
        list.join(", ")
    )
}

/// Sends `data` and reads the mirror's answer.
fn through(stream: &mut TcpStream, data: &[u8], answer_len: usize) -> Vec<u8> {
    stream.write_all(data).unwrap();
    let mut back = vec![0u8; answer_len];
    stream.read_exact(&mut back).unwrap();
    back
}

/// True if the connection was closed or reset by ringlb without an answer.
fn closed_without_answer(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn send_proxy_v1_and_v2_bytes_reach_the_backend_whole_and_first() {
    let backend = mirror(b"hello");
    for (version, ipv6) in [("v1", false), ("v2", false), ("v1", true), ("v2", true)] {
        let bind = if ipv6 { "[::1]:0" } else { "127.0.0.1:0" };
        let config = listener_config("", &[backend.addr], &format!("send_proxy = \"{version}\""))
            .replace("bind = \"127.0.0.1:0\"\npool", &format!("bind = \"{bind}\"\npool"));
        let lb = Ringlb::start(&config);
        let mut client = connect(lb.addr());
        let (src, dst) = (client.local_addr().unwrap(), lb.addr());
        let expected: Vec<u8> = match (version, src, dst) {
            ("v1", SocketAddr::V4(s), SocketAddr::V4(d)) => {
                format!("PROXY TCP4 {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port()).into_bytes()
            }
            ("v1", SocketAddr::V6(s), SocketAddr::V6(d)) => {
                format!("PROXY TCP6 {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port()).into_bytes()
            }
            ("v2", SocketAddr::V4(s), SocketAddr::V4(d)) => {
                let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
                h.extend_from_slice(&s.ip().octets());
                h.extend_from_slice(&d.ip().octets());
                h.extend_from_slice(&s.port().to_be_bytes());
                h.extend_from_slice(&d.port().to_be_bytes());
                h
            }
            ("v2", SocketAddr::V6(s), SocketAddr::V6(d)) => {
                let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
                h.extend_from_slice(&s.ip().octets());
                h.extend_from_slice(&d.ip().octets());
                h.extend_from_slice(&s.port().to_be_bytes());
                h.extend_from_slice(&d.port().to_be_bytes());
                h
            }
            _ => unreachable!(),
        };
        let back = through(&mut client, b"hello", expected.len() + 5);
        assert_eq!(
            &back[..expected.len()],
            &expected[..],
            "{version} ipv6={ipv6}: {:?}",
            String::from_utf8_lossy(&back)
        );
        assert_eq!(&back[expected.len()..], b"hello");
    }
}

#[test]
fn accept_proxy_carries_the_client_address_onward() {
    let backend = mirror(b"hello");
    let lb = Ringlb::start(&listener_config("accept_proxy = true", &[backend.addr], "send_proxy = \"v1\""));
    // v2 in, v1 out, with a client the front balancer saw.
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend_from_slice(&[203, 0, 113, 7, 198, 51, 100, 1]);
    header.extend_from_slice(&4242u16.to_be_bytes());
    header.extend_from_slice(&443u16.to_be_bytes());
    header.extend_from_slice(b"hello");
    let expected = b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\nhello";
    let mut client = connect(lb.addr());
    assert_eq!(through(&mut client, &header, expected.len()), expected);
    // A v1 header dribbled in three segments works too.
    let mut client = connect(lb.addr());
    for part in [&b"PROXY TCP4 192.0.2.1"[..], b" 192.0.2.2 1 2\r", b"\nhello"] {
        client.write_all(part).unwrap();
        thread::sleep(Duration::from_millis(30));
    }
    let expected = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nhello";
    let mut back = vec![0u8; expected.len()];
    client.read_exact(&mut back).unwrap();
    assert_eq!(back, expected);
}

#[test]
fn a_proxy_v2_header_with_large_tlvs_in_one_segment_is_read_whole() {
    // 1,845 bytes of header (a 1,800-byte NOOP TLV): more than a new connection's first read
    // takes, so the read buffer grows while the header is read.
    let backend = mirror(b"hello");
    let lb = Ringlb::start(&listener_config("accept_proxy = true", &[backend.addr], "send_proxy = \"v1\""));
    let tlv_len: u16 = 1800;
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
    header.extend_from_slice(&(12 + 3 + tlv_len).to_be_bytes());
    header.extend_from_slice(&[203, 0, 113, 9, 198, 51, 100, 1]);
    header.extend_from_slice(&4243u16.to_be_bytes());
    header.extend_from_slice(&443u16.to_be_bytes());
    header.push(0x04); // PP2_TYPE_NOOP
    header.extend_from_slice(&tlv_len.to_be_bytes());
    header.extend(std::iter::repeat_n(b'n', usize::from(tlv_len)));
    header.extend_from_slice(b"hello");
    let expected = b"PROXY TCP4 203.0.113.9 198.51.100.1 4243 443\r\nhello";
    let mut client = connect(lb.addr());
    assert_eq!(through(&mut client, &header, expected.len()), expected);
    assert_eq!(lb.metrics()["ringlb_connections_handshake_failed_total"], 0.0);
}

#[test]
fn missing_malformed_or_late_proxy_header_closes_and_counts() {
    let backend = mirror(b"hello");
    let lb = Ringlb::start(&listener_config("accept_proxy = true\nhandshake_timeout = \"300ms\"", &[backend.addr], ""));
    let mut no_header = connect(lb.addr());
    no_header.write_all(b"hello, no header here\r\n").unwrap();
    assert!(closed_without_answer(&mut no_header));
    let mut malformed = connect(lb.addr());
    malformed.write_all(b"PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\nhello").unwrap();
    assert!(closed_without_answer(&mut malformed));
    let mut silent = connect(lb.addr());
    assert!(closed_without_answer(&mut silent), "no header within handshake_timeout");
    assert_eq!(backend.accepted(), 0, "no backend was contacted");
    let metrics = lb.metrics();
    assert_eq!(metrics["ringlb_connections_handshake_failed_total"], 3.0, "{metrics:?}");
    // The first refusal is logged with its reason. (Later ones in the same second may be held
    // back: at most one refusal is logged per worker per second, with a count of the rest.)
    assert!(
        lb.logged("closed a connection from 127.0.0.1:") && lb.logged(": not a PROXY protocol header"),
        "{}",
        lb.log()
    );
}

#[test]
fn access_rules_apply_to_the_carried_address() {
    let backend = mirror(b"hello");
    let lb = Ringlb::start(&listener_config("accept_proxy = true\ndeny = [\"203.0.113.0/24\"]", &[backend.addr], ""));
    let mut denied = connect(lb.addr());
    denied.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\r\nhello").unwrap();
    assert!(closed_without_answer(&mut denied));
    let mut allowed = connect(lb.addr());
    let request = b"PROXY TCP4 198.51.100.7 10.0.0.1 1 2\r\nhello";
    assert_eq!(through(&mut allowed, request, 5), b"hello");
    assert_eq!(lb.metrics()["ringlb_connections_refused_access_total"], 1.0);
}

#[test]
fn allow_and_deny_lists_are_checked_before_any_backend() {
    let backend = Backend::echo();
    let lb = Ringlb::start(&listener_config(
        "allow = [\"127.0.1.0/24\", \"::1/128\"]\ndeny = [\"127.0.1.13\"]",
        &[backend.addr],
        "",
    ));
    let from = |ip: [u8; 4]| connect_from(IpAddr::from(ip), lb.addr());
    round_trip(&mut from([127, 0, 1, 5]), b"in the allow list").unwrap();
    assert!(refused_from(IpAddr::from([127, 0, 2, 5]), lb.addr()), "not in the allow list");
    assert!(refused_from(IpAddr::from([127, 0, 1, 13]), lb.addr()), "denied, though allowed");
    assert_eq!(backend.accepted(), 1);
    assert_eq!(lb.metrics()["ringlb_connections_refused_access_total"], 2.0);
    assert!(lb.logged("refused 127.0.2.5: not allowed by the listener's allow/deny rules"), "{}", lb.log());
}

#[test]
fn ipv6_deny_rule() {
    let backend = Backend::echo();
    let config =
        listener_config("deny = [\"::1/128\"]", &[backend.addr], "").replace("127.0.0.1:0\"\npool", "[::1]:0\"\npool");
    let lb = Ringlb::start(&config);
    assert!(refused_from("::1".parse().unwrap(), lb.addr()));
    assert_eq!(backend.accepted(), 0);
}

#[test]
fn max_conns_per_source_counts_over_all_workers() {
    let backend = Backend::echo();
    let lb = Ringlb::start(&listener_config("max_conns_per_source = 2", &[backend.addr], ""));
    let a = IpAddr::from([127, 0, 1, 9]);
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect_from(a, lb.addr())).collect();
    for s in held.iter_mut() {
        round_trip(s, b"x").unwrap();
    }
    // Whichever worker the third lands on, the count is shared.
    for _ in 0..4 {
        assert!(refused_from(a, lb.addr()), "a third connection from {a}");
    }
    round_trip(&mut connect_from(IpAddr::from([127, 0, 1, 10]), lb.addr()), b"another source").unwrap();
    drop(held.pop());
    assert!(
        Ringlb::eventually(Duration::from_secs(5), || {
            // Refused (reset, maybe before connect returns) until the slot is free.
            try_connect_from(a, lb.addr()).is_ok_and(|mut s| round_trip(&mut s, b"room again").is_ok())
        }),
        "a slot did not free"
    );
    // Four refusals above, and any retry above that came before the slot was free.
    assert!(lb.metrics()["ringlb_connections_refused_source_limit_total"] >= 4.0);
}

#[test]
fn backend_max_conns_queues_until_a_slot_frees_or_the_queue_timeout() {
    let backend = Backend::echo();
    let pool = "queue_timeout = \"10s\"";
    let config = listener_config("", &[backend.addr], pool).replace(
        &format!("{{ address = \"{}\" }}", backend.addr),
        &format!("{{ address = \"{}\", max_conns = 2 }}", backend.addr),
    );
    let lb = Ringlb::start(&config);
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect(lb.addr())).collect();
    for s in held.iter_mut() {
        round_trip(s, b"x").unwrap();
    }
    // Several rounds, so the waiting connection and the freed slot are sometimes on the same
    // worker and sometimes not.
    for round in 0..6 {
        let mut waiting = connect(lb.addr());
        waiting.write_all(b"waiting").unwrap();
        waiting.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut back = [0u8; 7];
        assert!(waiting.read_exact(&mut back).is_err(), "round {round}: served past max_conns");
        // Queued before the slot frees (else it would be served without waiting).
        assert!(
            Ringlb::eventually(Duration::from_secs(10), || lb.metrics()["ringlb_connections_queued_total"]
                == (round + 1) as f64),
            "round {round}: the connection was not queued"
        );
        drop(held.remove(0));
        waiting.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        waiting.read_exact(&mut back).unwrap_or_else(|e| panic!("round {round}: not served after a slot freed: {e}"));
        assert_eq!(&back, b"waiting");
        held.push(waiting);
    }
    let metrics = lb.metrics();
    assert_eq!(metrics["ringlb_connections_queued_total"], 6.0, "{metrics:?}");
    assert_eq!(lb.backend_metric("ringlb_backend_active_connections", "p", backend.addr), 2.0);
}

#[test]
fn queue_timeout_closes_a_waiting_connection() {
    let backend = Backend::echo();
    let config = listener_config("", &[backend.addr], "queue_timeout = \"300ms\"").replace(
        &format!("{{ address = \"{}\" }}", backend.addr),
        &format!("{{ address = \"{}\", max_conns = 1 }}", backend.addr),
    );
    let lb = Ringlb::start(&config);
    let mut held = connect(lb.addr());
    round_trip(&mut held, b"x").unwrap();
    let mut waiting = connect(lb.addr());
    waiting.write_all(b"waiting").unwrap();
    assert!(closed_without_answer(&mut waiting));
    assert_eq!(lb.metrics()["ringlb_connections_queue_timeout_total"], 1.0);
    round_trip(&mut held, b"the held one is fine").unwrap();
}

// ---- TLS: real handshakes through SNI routing ----

struct Tls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    client_no_sni: Arc<ClientConfig>,
}

fn tls() -> Tls {
    let names = ["db.example.com", "api.example.com", "x.eu.example.com", "other.org"].map(String::from).to_vec();
    let generated = rcgen::generate_simple_self_signed(names).unwrap();
    let cert: CertificateDer<'static> = generated.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client_no_sni = client.clone();
    client_no_sni.enable_sni = false;
    Tls { server: Arc::new(server), client: Arc::new(client), client_no_sni: Arc::new(client_no_sni) }
}

/// A TLS backend named `name`: answers each line with "NAME saw SNI: LINE".
fn tls_backend(name: &'static str, config: Arc<ServerConfig>, served: Arc<AtomicUsize>) -> Backend {
    Backend::start(move |stream| {
        let conn = ServerConnection::new(Arc::clone(&config)).unwrap();
        let mut tls = StreamOwned::new(conn, stream);
        let mut line = String::new();
        if BufReader::new(&mut tls).read_line(&mut line).is_err() {
            return;
        }
        served.fetch_add(1, Ordering::SeqCst);
        let sni = tls.conn.server_name().unwrap_or("-").to_string();
        let _ = write!(tls, "{name} saw {sni}: {line}");
        tls.conn.send_close_notify();
        let _ = tls.flush();
    })
}

/// A TLS client through ringlb: the handshake, a line, the answer. With `dribble`, the
/// ClientHello goes out in 40-byte TCP segments.
fn tls_request(addr: SocketAddr, config: &Arc<ClientConfig>, name: &str, dribble: bool) -> std::io::Result<String> {
    let mut conn = ClientConnection::new(Arc::clone(config), ServerName::try_from(name.to_string()).unwrap()).unwrap();
    let mut tcp = connect(addr);
    tcp.set_nodelay(true).unwrap();
    if dribble {
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        for chunk in hello.chunks(40) {
            tcp.write_all(chunk)?;
            thread::sleep(Duration::from_millis(5));
        }
    }
    let mut tls = StreamOwned::new(conn, tcp);
    tls.write_all(b"ping\n")?;
    let mut answer = String::new();
    BufReader::new(&mut tls).read_line(&mut answer)?;
    Ok(answer.trim_end().to_string())
}

#[test]
fn sni_routes_real_tls_to_two_backends_with_the_handshake_intact() {
    let tls = tls();
    let served: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let db = tls_backend("db", Arc::clone(&tls.server), Arc::clone(&served[0]));
    let web = tls_backend("web", Arc::clone(&tls.server), Arc::clone(&served[1]));
    let fallback = tls_backend("fallback", Arc::clone(&tls.server), Arc::clone(&served[2]));
    let config = format!(
        "workers = 2\nmetrics_bind = \"127.0.0.1:0\"\n\
         [listeners.tls]\nbind = \"127.0.0.1:0\"\npool = \"fallback\"\n\
         [listeners.tls.sni]\n\"db.example.com\" = \"db\"\n\"*.example.com\" = \"web\"\n\
         [pools.db]\nbackends = [{{ address = \"{}\" }}]\n[pools.db.health]\nenabled = false\n\
         [pools.web]\nbackends = [{{ address = \"{}\" }}]\n[pools.web.health]\nenabled = false\n\
         [pools.fallback]\nbackends = [{{ address = \"{}\" }}]\n[pools.fallback.health]\nenabled = false\n",
        db.addr, web.addr, fallback.addr
    );
    let lb = Ringlb::start(&config);
    let addr = lb.addr();
    // The certificate verifies and the backend saw the same server name: the ClientHello
    // reached it byte for byte.
    assert_eq!(tls_request(addr, &tls.client, "db.example.com", false).unwrap(), "db saw db.example.com: ping");
    assert_eq!(tls_request(addr, &tls.client, "api.example.com", false).unwrap(), "web saw api.example.com: ping");
    assert_eq!(tls_request(addr, &tls.client, "x.eu.example.com", true).unwrap(), "web saw x.eu.example.com: ping");
    assert_eq!(tls_request(addr, &tls.client, "db.example.com", true).unwrap(), "db saw db.example.com: ping");
    assert_eq!(tls_request(addr, &tls.client, "other.org", false).unwrap(), "fallback saw other.org: ping");
    assert_eq!(tls_request(addr, &tls.client_no_sni, "other.org", false).unwrap(), "fallback saw -: ping");
    // Not TLS at all: the default pool too (the fallback backend's TLS then fails on it).
    let mut plain = connect(addr);
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let _ = read_until_end(&mut plain);
    assert_eq!(served.iter().map(|s| s.load(Ordering::SeqCst)).collect::<Vec<_>>(), vec![2, 2, 2]);
    assert_eq!(lb.metrics()["ringlb_connections_handshake_failed_total"], 0.0);
}

#[test]
fn sni_without_default_pool_closes_unmatched_and_non_tls() {
    let tls = tls();
    let served = Arc::new(AtomicUsize::new(0));
    let db = tls_backend("db", Arc::clone(&tls.server), Arc::clone(&served));
    let config = format!(
        "workers = 2\nmetrics_bind = \"127.0.0.1:0\"\n[listeners.tls]\nbind = \"127.0.0.1:0\"\nhandshake_timeout = \"500ms\"\n\
         [listeners.tls.sni]\n\"db.example.com\" = \"db\"\n\
         [pools.db]\nbackends = [{{ address = \"{}\" }}]\n[pools.db.health]\nenabled = false\n",
        db.addr
    );
    let lb = Ringlb::start(&config);
    assert_eq!(tls_request(lb.addr(), &tls.client, "db.example.com", false).unwrap(), "db saw db.example.com: ping");
    assert!(tls_request(lb.addr(), &tls.client, "other.org", false).is_err());
    assert!(tls_request(lb.addr(), &tls.client_no_sni, "db.example.com", false).is_err());
    let mut plain = connect(lb.addr());
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(closed_without_answer(&mut plain));
    // Half a ClientHello, then nothing: closed at the handshake timeout.
    let mut conn =
        ClientConnection::new(Arc::clone(&tls.client), ServerName::try_from("db.example.com").unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let mut partial = connect(lb.addr());
    partial.write_all(&hello[..hello.len() / 2]).unwrap();
    assert!(closed_without_answer(&mut partial));
    assert_eq!(db.accepted(), 1, "only the routed connection reached the backend");
    assert_eq!(lb.metrics()["ringlb_connections_handshake_failed_total"], 4.0);
    assert!(lb.logged("no route for server name \"other.org\""), "{}", lb.log());
}

#[test]
fn proxy_headers_are_taken_only_from_proxy_from() {
    let backend = mirror(b"hello");
    let lb = Ringlb::start(&listener_config(
        "accept_proxy = true\nproxy_from = [\"127.0.3.0/24\"]\nallow = [\"198.51.100.0/24\"]",
        &[backend.addr],
        "",
    ));
    let request = b"PROXY TCP4 198.51.100.7 10.0.0.1 1 2\r\nhello";
    // From the balancer in front: its header decides, and the carried address is allowed.
    let mut trusted = connect_from(IpAddr::from([127, 0, 3, 1]), lb.addr());
    assert_eq!(through(&mut trusted, request, 5), b"hello");
    // From anywhere else the connection is refused before its header is read.
    assert!(refused_from(IpAddr::from([127, 0, 4, 1]), lb.addr()));
    assert_eq!(backend.accepted(), 1);
    assert_eq!(lb.metrics()["ringlb_connections_refused_proxy_source_total"], 1.0);
    assert!(lb.logged("refused 127.0.4.1: may not send a PROXY header"), "{}", lb.log());
}
