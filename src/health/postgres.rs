//! The PostgreSQL check (`protocol = "postgres"`, HAProxy's `pgsql-check user U`): send a
//! startup message for `user` and `database`; the server is up and accepting when it answers
//! with an authentication message, AuthenticationOk or a request for a password alike. An
//! ErrorResponse ("the database system is starting up", "too many clients") fails the check.
//! After AuthenticationOk the check sends Terminate; after a password request it just closes.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::CheckFailure;

/// Protocol 3.0.
const PROTOCOL: u32 = 3 << 16;
/// Largest message read.
const MAX_MESSAGE: usize = 64 * 1024;

/// The startup message.
pub fn startup(user: &str, database: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + user.len() + database.len());
    body.extend_from_slice(&PROTOCOL.to_be_bytes());
    for (key, value) in [("user", user), ("database", database), ("application_name", "ringlb health check")] {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    message
}

/// What the server's first message means: `Ok(true)` AuthenticationOk, `Ok(false)` another
/// authentication request, or the error it sent.
pub fn parse_reply(kind: u8, body: &[u8]) -> Result<bool, CheckFailure> {
    match kind {
        b'R' => {
            let code = body.get(..4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            code.map(|c| c == 0)
                .ok_or_else(|| CheckFailure::Protocol("postgres: a short authentication message".into()))
        }
        b'E' => {
            // Fields: a type byte and a NUL-terminated string each; 'M' is the message, 'C' the
            // SQLSTATE.
            let mut message = String::new();
            let mut code = String::new();
            for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
                let text = String::from_utf8_lossy(&field[1..]).into_owned();
                match field[0] {
                    b'M' => message = text,
                    b'C' => code = text,
                    _ => {}
                }
            }
            Err(CheckFailure::Refused(format!("postgres error {code}: {message}")))
        }
        other => Err(CheckFailure::Protocol(format!("postgres: an unexpected first message {:?}", other as char))),
    }
}

/// Sends the startup message and reads the first answer.
pub async fn check(stream: &mut TcpStream, user: &str, database: &str) -> Result<(), CheckFailure> {
    stream.write_all(&startup(user, database)).await.map_err(CheckFailure::Send)?;
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            CheckFailure::Protocol("postgres: the server closed the connection".into())
        } else {
            CheckFailure::Receive(e)
        }
    })?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(CheckFailure::Protocol(format!("postgres: a message of {len} bytes")));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await.map_err(CheckFailure::Receive)?;
    if parse_reply(head[0], &body)? {
        // Logged in: say goodbye (Terminate) so the server logs no lost connection.
        stream.write_all(&[b'X', 0, 0, 0, 4]).await.map_err(CheckFailure::Send)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_startup_message_is_protocol_3_with_user_and_database() {
        let message = startup("ringlb", "postgres");
        let len = u32::from_be_bytes(message[..4].try_into().unwrap()) as usize;
        assert_eq!(len, message.len());
        assert_eq!(&message[4..8], &[0, 3, 0, 0]);
        assert!(message.windows(12).any(|w| w == b"user\0ringlb\0"));
        assert!(message.ends_with(b"\0\0"));
    }

    #[test]
    fn any_authentication_request_passes_and_an_error_fails_with_its_text() {
        assert!(parse_reply(b'R', &0u32.to_be_bytes()).unwrap(), "AuthenticationOk");
        assert!(!parse_reply(b'R', &10u32.to_be_bytes()).unwrap(), "SASL: up and asking");
        let error = parse_reply(b'E', b"SFATAL\0C57P03\0Mthe database system is starting up\0\0").unwrap_err();
        assert_eq!(error.to_string(), "postgres error 57P03: the database system is starting up");
        assert!(parse_reply(b'N', b"").is_err());
        assert!(parse_reply(b'R', &[0, 0]).is_err());
    }
}
