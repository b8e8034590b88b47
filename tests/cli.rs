//! The command line as an operator uses it: check, run with a bad config, version, help.

mod common;

use std::process::Command;

use common::write_temp;

fn ringlb(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringlb")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_accepts_the_bundled_config() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/ringlb.toml");
    let (code, out, err) = ringlb(&["check", "--config", config]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("OK"), "{out}");
    assert!(out.contains("listener demo on 127.0.0.1:8080 -> pool demo (round_robin, 3 backends"), "{out}");
    assert!(out.contains("pool demo: TCP connect check every 2s, timeout 1s, rise 2, fall 3, on_down keep"), "{out}");
    assert!(out.contains("metrics on http://127.0.0.1:9100/metrics"), "{out}");
}

#[test]
fn check_rejects_with_file_line_key_and_what_is_valid() {
    let path = write_temp(
        "[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[pools.p]\nbackends = [\n  { address = \"127.0.0.1:2\", weight = 0 },\n]\n",
        "toml",
    );
    let (code, out, err) = ringlb(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let expected = format!("{}:6: pools.p.backends[0].weight: 0 is not a weight; use 1 to 256", path.display());
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn check_reports_unknown_key() {
    let path = write_temp("[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\nbacklog = 5\n", "toml");
    let (code, _, err) = ringlb(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains(":4:") && err.contains("backlog") && err.contains("`bind`, `pool`"), "{err}");
}

#[test]
fn check_reports_missing_file() {
    let (code, _, err) = ringlb(&["check", "-c", "/nonexistent/ringlb.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/ringlb.toml: cannot read"), "{err}");
}

#[test]
fn run_with_invalid_config_exits_one() {
    let path = write_temp("[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"missing\"\n", "toml");
    let (code, _, err) = ringlb(&["run", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("listeners.a.pool") && err.contains("\"missing\""), "{err}");
}

#[test]
fn run_reports_an_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let path = write_temp(
        &format!(
            "[listeners.a]\nbind = \"{addr}\"\npool = \"p\"\n[pools.p]\nbackends = [{{ address = \"127.0.0.1:2\" }}]\n"
        ),
        "toml",
    );
    let (code, _, err) = ringlb(&["run", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("listener a: cannot listen on {addr}")) && err.contains("in use"), "{err}");
}

#[test]
fn version_and_help() {
    let (code, out, _) = ringlb(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("ringlb {}", env!("CARGO_PKG_VERSION")));
    let (code, out, _) = ringlb(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("ringlb run -c config/ringlb.toml") && out.contains("SIGTERM"), "{out}");
    let (_, out, _) = ringlb(&["run", "--help"]);
    assert!(out.contains("--config <FILE>"), "{out}");
}

/// Runs `ringlb check` on `text`; returns the exit code and stderr.
fn check(text: &str) -> (i32, String, String) {
    let path = write_temp(text, "toml");
    let (code, out, err) = ringlb(&["check", "-c", path.to_str().unwrap()]);
    (code, out, err.replace(path.to_str().unwrap(), "FILE"))
}

const POOL: &str = "[pools.p]\nbackends = [{ address = \"127.0.0.1:2\" }]\n";

#[test]
fn check_warns_about_what_works_but_is_likely_wrong() {
    let text = format!(
        "[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\naccept_proxy = true\n{POOL}\
         [pools.spare]\nbackends = [{{ address = \"127.0.0.1:3\" }}]\n"
    );
    let (code, _, err) = check(&text);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: FILE:4: listeners.a.accept_proxy: any client may send a PROXY header"), "{err}");
    assert!(err.contains("warning: FILE:7: pools.spare: no listener sends connections to this pool"), "{err}");
}

#[test]
fn check_rejects_configs_that_cannot_work() {
    let cases: [(String, &str); 6] = [
        (
            format!("[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\nproxy_from = [\"10.0.0.0/8\"]\n{POOL}"),
            "FILE:4: listeners.a.proxy_from: proxy_from says who may send a PROXY header; it needs accept_proxy = true",
        ),
        (
            "[listeners.a]\nbind = \"127.0.0.1:7000\"\npool = \"p\"\n[pools.p]\nbackends = [\n  { address = \"127.0.0.1:7000\" },\n]\n"
                .to_string(),
            "FILE:6: pools.p.backends[0].address: 127.0.0.1:7000 is ringlb's own listener \"a\": connections would loop back",
        ),
        (
            "[listeners.a]\nbind = \"0.0.0.0:7001\"\npool = \"p\"\n[pools.p]\nbackends = [{ address = \"127.0.0.5:7001\" }]\n"
                .to_string(),
            "FILE:5: pools.p.backends[0].address: 127.0.0.5:7001 is ringlb's own listener \"a\"",
        ),
        (
            format!("[listeners.a]\nbind = \"192.0.2.77:8080\"\npool = \"p\"\n{POOL}"),
            "FILE:2: listeners.a.bind: 192.0.2.77 is not an address of this host",
        ),
        (
            format!("max_connections = 10\n[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\nmax_connections = 11\n{POOL}"),
            "FILE:5: listeners.a.max_connections: 11 is not a connection count; use 1 to 10 (the top-level max_connections)",
        ),
        (format!("[listeners.a]\nbind = \"127.0.0.1:1\"\npool = \"p\"\n{POOL}# {}\n", "x".repeat(5 << 20)), "FILE: larger than 4 MiB"),
    ];
    for (text, expected) in cases {
        let (code, out, err) = check(&text);
        assert_eq!(code, 1, "{expected}: {out}");
        assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
    }
}

#[test]
fn check_of_an_endless_file_stops() {
    let (code, _, err) = ringlb(&["check", "-c", "/dev/zero"]);
    assert_eq!(code, 1);
    assert!(err.contains("/dev/zero: larger than 4 MiB"), "{err}");
}

#[test]
fn a_second_ringlb_on_the_same_port_is_refused() {
    let text = format!(
        "workers = 2\n[listeners.a]\nbind = \"127.0.0.1:0\"\npool = \"p\"\n{POOL}[pools.p.health]\nenabled = false\n"
    );
    let first = common::Ringlb::start(&text);
    let addr = first.addr();
    let path = write_temp(&text.replace("127.0.0.1:0", &addr.to_string()), "toml");
    // Had it started, it would serve (and run) until stopped: wait for its exit a while.
    let mut second = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["run", "-c", path.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while second.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(20) {
            let _ = second.kill();
            panic!("a second ringlb started on {addr}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("listener a: cannot listen on {addr}")) && err.contains("in use"), "{err}");
}

#[test]
fn make_run_serves_where_it_says() {
    // `make run` is scripts/run-demo.sh on the bundled config (ports 8080, 9001-9003 and 9100):
    // it must print the listener's address, and a client there must reach a demo backend.
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::process::CommandExt;
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_ringlb")).parent().unwrap();
    let mut demo = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/run-demo.sh"))
        .env("BIN_DIR", bin_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let stop = |demo: &mut std::process::Child| {
        unsafe { libc::kill(-(demo.id() as i32), libc::SIGINT) };
        demo.wait().unwrap()
    };
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let said = lines.find_map(|l| l.ok()?.strip_prefix("ringlb is starting on ").map(str::to_string));
    let Some(said) = said else {
        stop(&mut demo);
        panic!("run-demo.sh did not say where ringlb listens");
    };
    let address: std::net::SocketAddr = said.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(address, "127.0.0.1:8080".parse().unwrap(), "the bundled listener, not the metrics port");
    // ringlb starts after the message: wait until it answers there.
    let mut answer = String::new();
    let served = common::Ringlb::eventually(std::time::Duration::from_secs(30), || {
        let Ok(mut stream) = std::net::TcpStream::connect(address) else { return false };
        stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let _ = stream.write_all(b"hello\n");
        let _ = stream.shutdown(std::net::Shutdown::Write);
        answer.clear();
        stream.read_to_string(&mut answer).is_ok() && answer.ends_with("hello\n")
    });
    let status = stop(&mut demo);
    assert!(served, "nothing answered on {address}: {answer:?}");
    assert!(answer.starts_with("hello from backend 127.0.0.1:900"), "{answer:?}");
    assert!(status.success() || status.code() == Some(130), "{status}");
}
