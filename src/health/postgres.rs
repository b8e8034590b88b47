//! The PostgreSQL check (`protocol = "postgres"`, HAProxy's `pgsql-check user U`): send a
//! startup message for `user` and `database`; the server is up and accepting when it answers
//! with an authentication message, AuthenticationOk or a request for a password alike. An
//! ErrorResponse ("the database system is starting up", "too many clients", "database does
//! not exist" after AuthenticationOk) fails the check. After AuthenticationOk the check waits
//! for ReadyForQuery and sends Terminate; after a password request it just closes.

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
                let text = super::shown(&field[1..]);
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

async fn read_message(stream: &mut TcpStream) -> Result<(u8, Vec<u8>), CheckFailure> {
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
    Ok((head[0], body))
}

/// Most messages read after AuthenticationOk before ReadyForQuery (parameter statuses, the
/// backend key, notices).
const MAX_STARTUP_MESSAGES: usize = 256;

/// Sends the startup message and reads the answer: an authentication request passes; after
/// AuthenticationOk the session must start (ReadyForQuery; an ErrorResponse such as "database
/// does not exist" or "too many clients" fails), then Terminate says goodbye so the server
/// logs no lost connection.
pub async fn check(stream: &mut TcpStream, user: &str, database: &str) -> Result<(), CheckFailure> {
    stream.write_all(&startup(user, database)).await.map_err(CheckFailure::Send)?;
    let (kind, body) = read_message(stream).await?;
    if !parse_reply(kind, &body)? {
        return Ok(());
    }
    for _ in 0..MAX_STARTUP_MESSAGES {
        match read_message(stream).await? {
            (b'Z', _) => {
                stream.write_all(&[b'X', 0, 0, 0, 4]).await.map_err(CheckFailure::Send)?;
                return Ok(());
            }
            (b'E', body) => return parse_reply(b'E', &body).map(|_| ()),
            _ => {}
        }
    }
    Err(CheckFailure::Protocol(format!("postgres: no ReadyForQuery within {MAX_STARTUP_MESSAGES} messages")))
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
        let forged = parse_reply(b'E', b"C28000\0Mno\n[2026-01-01T00:00:00Z ERROR ringlb] forged\0\0").unwrap_err();
        assert_eq!(forged.to_string(), "postgres error 28000: no\\n[2026-01-01T00:00:00Z ERROR ringlb] forged");
        assert!(parse_reply(b'N', b"").is_err());
        assert!(parse_reply(b'R', &[0, 0]).is_err());
    }

    /// Runs the check against a server that reads the startup message and answers `replies`;
    /// returns the outcome and what the check sent after the startup message.
    fn converse(replies: Vec<u8>) -> (Result<(), CheckFailure>, Vec<u8>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut len = [0u8; 4];
            stream.read_exact(&mut len).unwrap();
            let mut startup = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            stream.read_exact(&mut startup).unwrap();
            stream.write_all(&replies).unwrap();
            let mut after = Vec::new();
            let _ = stream.read_to_end(&mut after);
            after
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let outcome = runtime.block_on(async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let outcome = check(&mut stream, "ringlb", "postgres").await;
            drop(stream);
            outcome
        });
        (outcome, server.join().unwrap())
    }

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn after_authentication_ok_the_session_must_start_and_is_terminated() {
        let mut ready = message(b'R', &0u32.to_be_bytes());
        ready.extend(message(b'S', b"server_version\x0015.18\0"));
        ready.extend(message(b'K', &[0; 8]));
        ready.extend(message(b'Z', b"I"));
        let (outcome, after) = converse(ready);
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(after, [b'X', 0, 0, 0, 4], "Terminate");

        let mut no_database = message(b'R', &0u32.to_be_bytes());
        no_database.extend(message(b'E', b"SFATAL\0C3D000\0Mdatabase \"nope\" does not exist\0\0"));
        let error = converse(no_database).0.unwrap_err().to_string();
        assert!(error.contains("postgres error 3D000: database \"nope\" does not exist"), "{error}");

        let (outcome, after) = converse(message(b'R', &10u32.to_be_bytes()));
        assert!(outcome.is_ok(), "a password request: up");
        assert!(after.is_empty(), "no password sent: {after:?}");
    }
}
