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
