//! The MySQL/MariaDB check (`protocol = "mysql"`, HAProxy's `mysql-check user U`): read the
//! server's greeting, log in as a user without a password, and quit with COM_QUIT. A
//! completed login is not a connection error to the server, where a connect-and-close check
//! is one: after `max_connect_errors` of those, the server blocks the checking host, and with
//! it every client behind the balancer.
//!
//! Packets: a 3-byte little-endian length, a sequence number, the payload.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::CheckFailure;

const CLIENT_LONG_PASSWORD: u32 = 0x1;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;
/// The authentication plugin named in our login; with an empty password any plugin takes an
/// empty answer.
const PLUGIN: &[u8] = b"mysql_native_password";
/// Largest packet read.
const MAX_PACKET: usize = 64 * 1024;

/// What the server's first packet says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub version: String,
    pub capabilities: u32,
}

/// Parses the server's first packet: a greeting (protocol 10), or the error it sent instead
/// (e.g. "Host ... is blocked because of many connection errors").
pub fn parse_greeting(payload: &[u8]) -> Result<Greeting, CheckFailure> {
    let bad = |what: &str| CheckFailure::Protocol(format!("mysql: {what}"));
    match payload.first() {
        Some(0xff) => return Err(server_error(payload)),
        Some(10) => {}
        Some(other) => return Err(bad(&format!("unknown protocol version {other}"))),
        None => return Err(bad("an empty greeting")),
    }
    let rest = &payload[1..];
    let end = rest.iter().position(|&b| b == 0).ok_or_else(|| bad("a greeting without a version"))?;
    let version = String::from_utf8_lossy(&rest[..end]).into_owned();
    // thread id (4), auth data part 1 (8), filler (1), capabilities low (2), charset (1),
    // status (2), capabilities high (2).
    let fixed = rest.get(end + 1..end + 1 + 20).ok_or_else(|| bad("a greeting cut short"))?;
    let low = u32::from(u16::from_le_bytes([fixed[13], fixed[14]]));
    let high = u32::from(u16::from_le_bytes([fixed[18], fixed[19]]));
    Ok(Greeting { version, capabilities: low | high << 16 })
}

/// The login (HandshakeResponse41) as `user` with an empty password, for a server with
/// `capabilities`.
pub fn login(user: &str, capabilities: u32) -> Vec<u8> {
    let ours = CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH;
    let flags = ours & (capabilities | CLIENT_PROTOCOL_41);
    let mut payload = Vec::with_capacity(64 + user.len());
    payload.extend_from_slice(&flags.to_le_bytes());
    payload.extend_from_slice(&(16u32 << 20).to_le_bytes()); // max packet size
    payload.push(33); // utf8_general_ci
    payload.extend_from_slice(&[0; 23]);
    payload.extend_from_slice(user.as_bytes());
    payload.push(0);
    if flags & CLIENT_SECURE_CONNECTION != 0 {
        payload.push(0); // an empty auth response, length-prefixed
    } else {
        payload.push(0); // an empty auth response, NUL-terminated
    }
    if flags & CLIENT_PLUGIN_AUTH != 0 {
        payload.extend_from_slice(PLUGIN);
        payload.push(0);
    }
    payload
}

/// The text of an ERR packet: "ERROR 1129 (HY000): Host ... is blocked".
fn server_error(payload: &[u8]) -> CheckFailure {
    let code = payload.get(1..3).map_or(0, |c| u16::from_le_bytes([c[0], c[1]]));
    // With CLIENT_PROTOCOL_41 a '#' and a 5-byte SQL state follow (not in a pre-login error).
    let message = match payload.get(3) {
        Some(b'#') => payload.get(9..).unwrap_or_default(),
        _ => payload.get(3..).unwrap_or_default(),
    };
    CheckFailure::Refused(format!("mysql error {code}: {}", super::shown(message)))
}

async fn read_packet(stream: &mut TcpStream) -> Result<(u8, Vec<u8>), CheckFailure> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await.map_err(|e| eof_or(e, "mysql"))?;
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    if len > MAX_PACKET {
        return Err(CheckFailure::Protocol(format!("mysql: a packet of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.map_err(|e| eof_or(e, "mysql"))?;
    Ok((head[3], payload))
}

fn eof_or(e: std::io::Error, what: &str) -> CheckFailure {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        CheckFailure::Protocol(format!("{what}: the server closed the connection"))
    } else {
        CheckFailure::Receive(e)
    }
}

async fn write_packet(stream: &mut TcpStream, sequence: u8, payload: &[u8]) -> Result<(), CheckFailure> {
    let len = payload.len() as u32;
    let mut packet = Vec::with_capacity(4 + payload.len());
    packet.extend_from_slice(&len.to_le_bytes()[..3]);
    packet.push(sequence);
    packet.extend_from_slice(payload);
    stream.write_all(&packet).await.map_err(CheckFailure::Send)
}

/// Logs in as `user` and quits; passes when the server accepts the login.
pub async fn check(stream: &mut TcpStream, user: &str) -> Result<(), CheckFailure> {
    let (_, greeting) = read_packet(stream).await?;
    let greeting = parse_greeting(&greeting)?;
    write_packet(stream, 1, &login(user, greeting.capabilities)).await?;
    loop {
        let (sequence, reply) = read_packet(stream).await?;
        match reply.first() {
            Some(0x00) => break,
            Some(0xff) => return Err(server_error(&reply)),
            // An authentication switch: the empty password again, for the plugin it names.
            Some(0xfe) => write_packet(stream, sequence.wrapping_add(1), &[]).await?,
            // More authentication data (caching_sha2's "fast auth"): the OK follows.
            Some(0x01) => {}
            _ => return Err(CheckFailure::Protocol("mysql: an unexpected reply to the login".into())),
        }
    }
    // COM_QUIT: the server closes; close_politely waits for it.
    write_packet(stream, 0, &[0x01]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A MariaDB 10.11 greeting, as captured.
    fn greeting() -> Vec<u8> {
        let mut p = vec![10];
        p.extend_from_slice(b"5.5.5-10.11.6-MariaDB-0+deb12u1\0");
        p.extend_from_slice(&7u32.to_le_bytes()); // thread id
        p.extend_from_slice(b"abcdefgh"); // auth data 1
        p.push(0);
        p.extend_from_slice(&0xf7feu16.to_le_bytes()); // capabilities low
        p.push(45);
        p.extend_from_slice(&2u16.to_le_bytes());
        p.extend_from_slice(&0x81bfu16.to_le_bytes()); // capabilities high (plugin auth)
        p.push(21);
        p.extend_from_slice(&[0; 10]);
        p.extend_from_slice(b"ijklmnopqrst\0");
        p.extend_from_slice(b"mysql_native_password\0");
        p
    }

    #[test]
    fn a_greeting_is_read_and_the_login_names_the_user_and_no_password() {
        let parsed = parse_greeting(&greeting()).unwrap();
        assert_eq!(parsed.version, "5.5.5-10.11.6-MariaDB-0+deb12u1");
        assert_ne!(parsed.capabilities & CLIENT_PLUGIN_AUTH, 0);
        let login = login("ringlb", parsed.capabilities);
        let flags = u32::from_le_bytes(login[..4].try_into().unwrap());
        // What both sides have: this server does not offer LONG_PASSWORD.
        assert_eq!(flags, CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH);
        assert_eq!(&login[32..39], b"ringlb\0");
        assert_eq!(login[39], 0, "an empty password");
        assert!(login.ends_with(b"mysql_native_password\0"));
    }

    #[test]
    fn an_error_instead_of_a_greeting_says_what_the_server_said() {
        let mut blocked = vec![0xff];
        blocked.extend_from_slice(&1129u16.to_le_bytes());
        blocked.extend_from_slice(b"Host '10.200.0.1' is blocked because of many connection errors");
        let error = parse_greeting(&blocked).unwrap_err().to_string();
        assert!(error.contains("mysql error 1129: Host '10.200.0.1' is blocked"), "{error}");
        assert!(parse_greeting(&[9, 0]).is_err());
        assert!(parse_greeting(&[10, b'x', 0, 1]).is_err(), "cut short");
    }
}
