//! Stopping and running out of resources: SIGTERM/SIGINT drains, the drain deadline, and
//! accept backing off when the process has no file descriptors left.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use common::*;

/// A client that keeps sending and checking the echo until told to stop.
struct Streamer {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    handle: thread::JoinHandle<std::io::Result<()>>,
}

impl Streamer {
    fn start(mut stream: TcpStream) -> Streamer {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let (stop2, bytes2) = (Arc::clone(&stop), Arc::clone(&bytes));
        let handle = thread::spawn(move || {
            let chunk = random_bytes(16 * 1024, 99);
            let mut back = vec![0u8; chunk.len()];
            while !stop2.load(Ordering::SeqCst) {
                stream.write_all(&chunk)?;
                stream.read_exact(&mut back)?;
                assert!(back == chunk, "echo corrupted");
                bytes2.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            stream.shutdown(Shutdown::Write)?;
            let (rest, end) = read_until_end(&mut stream);
            assert!(rest.is_empty());
            end
        });
        Streamer { stop, bytes, handle }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    fn finish(self) -> std::io::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

fn refused(addr: std::net::SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

#[test]
fn sigterm_drains_streaming_connection_refuses_new_ones_and_exits_zero() {
    let backend = Backend::echo();
    let mut lb = Ringlb::start(&config_for(&[backend.addr], "drain_timeout = \"60s\"", ""));
    let addr = lb.addr();
    let streamer = Streamer::start(connect(addr));
    assert!(Ringlb::eventually(Duration::from_secs(10), || streamer.bytes() > 1 << 20));

    lb.signal(libc::SIGTERM);
    assert!(Ringlb::eventually(Duration::from_secs(10), || refused(addr)), "new connections still accepted");
    // The open connection keeps flowing after the listeners are gone.
    let before = streamer.bytes();
    assert!(
        Ringlb::eventually(Duration::from_secs(10), || streamer.bytes() > before + (1 << 20)),
        "stream stalled during drain"
    );
    assert!(lb.wait_exit(Duration::from_millis(300)).is_none(), "exited while a connection was open");

    streamer.finish().expect("the stream ends cleanly");
    // Well before the 60 s drain deadline: it exits when the last connection ends.
    let status = lb.wait_exit(Duration::from_secs(30)).expect("did not exit after its last connection ended");
    assert!(status.success(), "exit status {status}");
    assert!(lb.logged("SIGTERM: draining"));
}

#[test]
fn drain_deadline_closes_what_is_left_and_exits_zero() {
    let backend = Backend::echo();
    let mut lb = Ringlb::start(&config_for(&[backend.addr], "drain_timeout = \"1s\"", ""));
    let mut held = connect(lb.addr());
    round_trip(&mut held, b"hello").unwrap();
    lb.signal(libc::SIGINT);
    let status = lb.wait_exit(Duration::from_secs(30)).expect("did not exit at the drain deadline");
    assert!(status.success(), "exit status {status}");
    let (data, end) = read_until_end(&mut held);
    assert!(data.is_empty());
    end.expect("closed with FIN");
    assert!(lb.logged("closing 1 connections (drain deadline)"), "{}", lb.log());
}

#[test]
fn second_signal_closes_at_once() {
    let backend = Backend::echo();
    let mut lb = Ringlb::start(&config_for(&[backend.addr], "drain_timeout = \"1h\"", ""));
    let mut held = connect(lb.addr());
    round_trip(&mut held, b"hello").unwrap();
    lb.signal(libc::SIGTERM);
    assert!(Ringlb::eventually(Duration::from_secs(10), || lb.log().contains("draining")));
    lb.signal(libc::SIGTERM);
    let status = lb.wait_exit(Duration::from_secs(30)).expect("second signal did not stop it");
    assert!(status.success());
    let (_, end) = read_until_end(&mut held);
    end.expect("closed with FIN");
    assert!(lb.logged("closing remaining connections now"));
}

#[test]
fn out_of_file_descriptors_backs_off_and_keeps_serving() {
    raise_fd_limit();
    let backend = Backend::echo();
    // Room for a dozen connections at most, and a max_connections that does not stop sooner:
    // accept itself runs out of descriptors.
    // Health checks every 100 ms: while descriptors are short they fail for want of a socket,
    // which must not count against the backend.
    let health = "[pools.p.health]\ninterval = \"100ms\"\ntimeout = \"1s\"\nfall = 2";
    let mut lb = Ringlb::start_with_fd_limit(&config_for(&[backend.addr], "max_connections = 1000", health), Some(40));
    assert!(lb.logged("max_connections 1000 is more than the file-descriptor limit (40) allows"), "{}", lb.log());
    let addr = lb.addr();
    let baseline = lb.fd_count();
    let mut streams: Vec<TcpStream> = (0..40).map(|_| connect(addr)).collect();
    for stream in streams.iter_mut() {
        stream.write_all(b"ping").unwrap();
    }
    // Accepting runs out of descriptors (and backs off) before all 40 are served.
    assert!(lb.logged("Too many open files"), "{}", lb.log());
    let mut served = 0;
    for stream in streams.iter_mut() {
        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut back = [0u8; 4];
        if stream.read_exact(&mut back).is_ok() {
            served += 1;
        }
    }
    assert!(served > 0 && served < 40, "served {served} of 40 with 40 descriptors");

    drop(streams);
    // Once the queued connections are through (out of the accept queue and closed),
    // descriptors are free again and new connections are served. (A health check's socket
    // may be open at either count: one more is allowed.)
    assert!(
        Ringlb::eventually(Duration::from_secs(20), || Ringlb::accept_queue(addr.port()) == 0
            && lb.fd_count() <= baseline + 1),
        "fd count {} did not return to {baseline}, or {} still queued",
        lb.fd_count(),
        Ringlb::accept_queue(addr.port())
    );
    for i in 0..5 {
        let mut stream = connect(addr);
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        round_trip(&mut stream, format!("after {i}").as_bytes()).expect("served again after the shortage");
    }
    assert!(!lb.log().contains("DOWN"), "a descriptor shortage marked the backend down:\n{}", lb.log());
    let counters = lb.stop();
    // Backing off, not spinning: every failed accept pauses accepting (one failure per pause
    // and worker at most), where a spinning accept would fail thousands of times per pause.
    let (errors, pauses) = (counters["accept_errors_total"], counters["accept_backoffs_total"]);
    assert!(errors > 0 && pauses > 0, "{counters:?}");
    assert!(errors <= pauses + 2, "{errors} accept failures for {pauses} pauses: accept is spinning");
}

#[test]
fn max_connections_holds_new_ones_in_the_backlog_until_one_closes() {
    let backend = Backend::echo();
    let mut lb = Ringlb::start(&config_for(&[backend.addr], "workers = 1\nmax_connections = 3", ""));
    let addr = lb.addr();
    let mut open: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
    for stream in open.iter_mut() {
        round_trip(stream, b"in").unwrap();
    }
    // The fourth connects (the kernel completes the handshake) but is not served yet.
    let mut waiting = connect(addr);
    waiting.write_all(b"wait").unwrap();
    assert!(Ringlb::eventually(Duration::from_secs(10), || Ringlb::accept_queue(addr.port()) == 1));
    assert_eq!(backend.accepted(), 3);
    let mut back = [0u8; 4];
    // One closes: the waiting one is accepted and relayed, nothing was lost.
    drop(open.pop());
    waiting.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    waiting.read_exact(&mut back).expect("served once a slot freed");
    assert_eq!(&back, b"wait");
    drop((open, waiting));
    let counters = lb.stop();
    assert_eq!(counters["connections_over_limit_total"], 0, "{counters:?}");
    assert_eq!(counters["connections_accepted_total"], 4);
}

#[test]
fn stray_signals_change_nothing_and_sigquit_drains() {
    let backend = Backend::echo();
    let mut lb = Ringlb::start(&config_for(&[backend.addr], "drain_timeout = \"60s\"", ""));
    let mut held = connect(lb.addr());
    round_trip(&mut held, b"before").unwrap();
    for (signal, name) in [(libc::SIGUSR1, "SIGUSR1"), (libc::SIGALRM, "SIGALRM"), (libc::SIGTTIN, "SIGTTIN")] {
        lb.signal(signal);
        let line = format!("{name}: ignored");
        assert!(Ringlb::eventually(Duration::from_secs(10), || lb.log().contains(&line)), "{name}: {}", lb.log());
    }
    assert!(lb.wait_exit(Duration::ZERO).is_none(), "a stray signal ended ringlb");
    round_trip(&mut held, b"after").unwrap();
    round_trip(&mut connect(lb.addr()), b"new").unwrap();
    // SIGQUIT is a graceful stop, as for nginx: the open connection finishes first.
    lb.signal(libc::SIGQUIT);
    assert!(Ringlb::eventually(Duration::from_secs(10), || lb.log().contains("SIGQUIT: draining")));
    round_trip(&mut held, b"while draining").unwrap();
    drop(held);
    let status = lb.wait_exit(Duration::from_secs(30)).expect("exits once its connection ended");
    assert!(status.success(), "exit status {status}");
}
