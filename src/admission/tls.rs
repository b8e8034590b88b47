//! Reading the server name (SNI) from a TLS ClientHello without terminating TLS.
//!
//! [`read_client_hello`] looks at the first bytes a client sent. The ClientHello may come in
//! several TLS records and several TCP segments: it answers `Incomplete` until the whole
//! message is there, at most [`MAX_CLIENT_HELLO`] bytes of records, and never panics. Nothing is
//! consumed: the caller relays every byte it read, untouched, to the backend it picks.

/// The most record bytes read while looking for the end of the ClientHello.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

const RECORD_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXTENSION_SERVER_NAME: u16 = 0x0000;
const NAME_TYPE_HOST: u8 = 0x00;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed.
    Incomplete,
    /// The bytes are not a TLS handshake at all.
    NotTls,
    /// A whole ClientHello, with its server name (lower case, without a trailing dot) if it
    /// has one.
    Complete { server_name: Option<String> },
}

/// Why a TLS-looking stream is not a usable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLong,
    #[error("malformed TLS record or ClientHello")]
    Malformed,
    #[error("the server name is not a valid host name")]
    BadServerName,
}

/// Reads the ClientHello at the start of `buf`.
pub fn read_client_hello(buf: &[u8]) -> Result<Hello, HelloError> {
    if buf.is_empty() {
        return Ok(Hello::Incomplete);
    }
    if buf[0] != RECORD_HANDSHAKE {
        return Ok(Hello::NotTls);
    }
    if buf.len() >= 2 && buf[1] != 0x03 {
        return Ok(Hello::NotTls);
    }
    // Gather the handshake bytes from consecutive records until the message is complete.
    let mut message = Vec::new();
    let mut at = 0;
    loop {
        if at >= MAX_CLIENT_HELLO {
            return Err(HelloError::TooLong);
        }
        let Some(header) = buf.get(at..at + 5) else { return Ok(Hello::Incomplete) };
        if header[0] != RECORD_HANDSHAKE || header[1] != 0x03 {
            return Err(HelloError::Malformed);
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > 16384 + 2048 {
            return Err(HelloError::Malformed);
        }
        if at + 5 + length > MAX_CLIENT_HELLO {
            return Err(HelloError::TooLong);
        }
        let Some(fragment) = buf.get(at + 5..at + 5 + length) else {
            // Partial record: what it has so far may already tell the message is bad.
            return check_partial(&message, &buf[at + 5..]);
        };
        message.extend_from_slice(fragment);
        at += 5 + length;
        if message.len() >= 4 {
            if message[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::Malformed);
            }
            let body = (usize::from(message[1]) << 16) | (usize::from(message[2]) << 8) | usize::from(message[3]);
            if 4 + body > MAX_CLIENT_HELLO {
                return Err(HelloError::TooLong);
            }
            if message.len() >= 4 + body {
                return parse_body(&message[4..4 + body]).map(|server_name| Hello::Complete { server_name });
            }
        }
    }
}

fn check_partial(message: &[u8], partial: &[u8]) -> Result<Hello, HelloError> {
    let first = message.first().or(partial.first());
    match first {
        Some(&t) if t != HANDSHAKE_CLIENT_HELLO => Err(HelloError::Malformed),
        _ => Ok(Hello::Incomplete),
    }
}

/// A cursor over the message that fails instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HelloError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, HelloError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A block with a length prefix of `width` bytes.
    fn block(&mut self, width: usize) -> Result<Reader<'a>, HelloError> {
        let len = if width == 1 { usize::from(self.u8()?) } else { usize::from(self.u16()?) };
        Ok(Reader(self.take(len)?))
    }
}

fn parse_body(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    let session_id = r.block(1)?;
    if session_id.0.len() > 32 {
        return Err(HelloError::Malformed);
    }
    let suites = r.block(2)?;
    if suites.0.is_empty() || suites.0.len() % 2 != 0 {
        return Err(HelloError::Malformed);
    }
    r.block(1)?; // compression methods
    if r.0.is_empty() {
        return Ok(None); // no extensions at all (old clients)
    }
    let mut extensions = r.block(2)?;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.block(2)?;
        if kind != EXTENSION_SERVER_NAME {
            continue;
        }
        let mut names = data.block(2)?;
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.block(2)?;
            if name_type == NAME_TYPE_HOST {
                return host_name(name.0).map(Some);
            }
        }
        return Ok(None);
    }
    Ok(None)
}

/// A host name as it is matched: ASCII letters, digits, '-', '_' and dots, lower case, no
/// trailing dot.
fn host_name(raw: &[u8]) -> Result<String, HelloError> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > 253 || !raw.iter().all(|&b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(HelloError::BadServerName);
    }
    Ok(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

#[cfg(test)]
pub mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A minimal TLS 1.2-style ClientHello with the given server name, as one record.
    pub fn client_hello(server_name: Option<&str>, extra_extension_bytes: usize) -> Vec<u8> {
        let mut extensions = Vec::new();
        // An unrelated extension first (supported_groups), padded as asked.
        extensions.extend_from_slice(&[0x00, 0x0a]);
        extensions.extend_from_slice(&((2 + extra_extension_bytes) as u16).to_be_bytes());
        extensions.extend_from_slice(&(extra_extension_bytes as u16).to_be_bytes());
        extensions.extend(std::iter::repeat_n(0x17, extra_extension_bytes));
        if let Some(name) = server_name {
            let name = name.as_bytes();
            extensions.extend_from_slice(&[0x00, 0x00]);
            extensions.extend_from_slice(&((name.len() + 5) as u16).to_be_bytes());
            extensions.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
            extensions.push(0x00);
            extensions.extend_from_slice(&(name.len() as u16).to_be_bytes());
            extensions.extend_from_slice(name);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0xab; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        records(&message, 16384)
    }

    /// Splits a handshake message into records of at most `size` bytes.
    pub fn records(message: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(size) {
            out.extend_from_slice(&[RECORD_HANDSHAKE, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn message_of(hello: &[u8]) -> Vec<u8> {
        hello.chunks(16384 + 5).flat_map(|r| r[5..].to_vec()).collect()
    }

    #[test]
    fn finds_the_server_name() {
        let hello = client_hello(Some("DB.Example.com."), 10);
        assert_eq!(read_client_hello(&hello), Ok(Hello::Complete { server_name: Some("db.example.com".into()) }));
        assert_eq!(read_client_hello(&client_hello(None, 0)), Ok(Hello::Complete { server_name: None }));
    }

    #[test]
    fn incomplete_until_the_last_byte_of_a_fragmented_hello() {
        let message = message_of(&client_hello(Some("a.example.com"), 3000));
        // Records of 100 bytes, as some clients and middleboxes send them.
        let fragmented = records(&message, 100);
        for cut in 0..fragmented.len() {
            assert_eq!(read_client_hello(&fragmented[..cut]), Ok(Hello::Incomplete), "cut at {cut}");
        }
        let mut with_data = fragmented.clone();
        with_data.extend_from_slice(b"more records");
        assert_eq!(read_client_hello(&with_data), Ok(Hello::Complete { server_name: Some("a.example.com".into()) }));
    }

    #[test]
    fn not_tls_is_told_from_the_first_bytes() {
        assert_eq!(read_client_hello(b"GET / HTTP/1.1\r\n"), Ok(Hello::NotTls));
        assert_eq!(read_client_hello(b"PROXY TCP4"), Ok(Hello::NotTls));
        assert_eq!(read_client_hello(&[0x16, 0x02]), Ok(Hello::NotTls));
        assert_eq!(read_client_hello(&[0x16]), Ok(Hello::Incomplete));
    }

    #[test]
    fn rejects_oversized_and_malformed() {
        let huge = client_hello(Some("x.example.com"), MAX_CLIENT_HELLO);
        assert_eq!(read_client_hello(&huge), Err(HelloError::TooLong));
        // A handshake message that is not a ClientHello (a ServerHello).
        assert_eq!(read_client_hello(&records(&[0x02, 0, 0, 1, 0], 100)), Err(HelloError::Malformed));
        // A name with a space.
        assert_eq!(read_client_hello(&client_hello(Some("bad name"), 0)), Err(HelloError::BadServerName));
        // A length that runs past the message.
        let mut broken = message_of(&client_hello(Some("a.b"), 0));
        let last = broken.len() - 5;
        broken[last] = 0xff;
        assert_eq!(read_client_hello(&records(&broken, 16384)), Err(HelloError::Malformed));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read_client_hello(&bytes);
            let mut framed = vec![0x16, 0x03, 0x01, (bytes.len() >> 8) as u8, bytes.len() as u8];
            framed.extend_from_slice(&bytes);
            let _ = read_client_hello(&framed);
            let mut hello = vec![0x16, 0x03, 0x01, ((bytes.len() + 4) >> 8) as u8, (bytes.len() + 4) as u8, 1, 0, (bytes.len() >> 8) as u8, bytes.len() as u8];
            hello.extend_from_slice(&bytes);
            let _ = read_client_hello(&hello);
        }

        #[test]
        fn any_name_round_trips(name in "[a-z0-9]{1,20}(\\.[a-z0-9-]{1,20}){0,4}", pad in 0usize..2000, record in 50usize..16384) {
            let message = message_of(&client_hello(Some(&name), pad));
            let hello = records(&message, record);
            prop_assert_eq!(read_client_hello(&hello), Ok(Hello::Complete { server_name: Some(name) }));
        }
    }
}

/// A listener's server-name routes: exact names and `*.suffix` wildcards, each to a pool.
/// An exact name wins over wildcards; among wildcards the longest suffix wins. A wildcard
/// matches one or more labels, as nginx's `*.example.com` does (`a.example.com`,
/// `a.b.example.com`, not `example.com`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SniRoutes {
    exact: std::collections::BTreeMap<String, usize>,
    /// (".example.com", pool), longest first.
    suffixes: Vec<(String, usize)>,
}

impl SniRoutes {
    /// Adds a route; `pattern` is a host name or `*.` and a host name. The error says what
    /// would be valid.
    pub fn add(&mut self, pattern: &str, pool: usize) -> Result<(), String> {
        let lower = pattern.to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid = host_name(name.as_bytes()).ok().filter(|n| n == name && !n.starts_with('.') && !n.contains(".."));
        let Some(name) = valid else {
            return Err(format!(
                "{pattern:?} is not a server name; use a host name (\"db.example.com\") or a wildcard (\"*.example.com\")"
            ));
        };
        let duplicate = if wildcard {
            let suffix = format!(".{name}");
            let dup = self.suffixes.iter().any(|(s, _)| *s == suffix);
            self.suffixes.push((suffix, pool));
            self.suffixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
            dup
        } else {
            self.exact.insert(name, pool).is_some()
        };
        if duplicate { Err(format!("{pattern:?} is listed twice (names are not case-sensitive)")) } else { Ok(()) }
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }

    /// Whether some route leads to `pool`.
    pub fn routes_to(&self, pool: usize) -> bool {
        self.exact.values().chain(self.suffixes.iter().map(|(_, p)| p)).any(|&p| p == pool)
    }

    /// The pool for a server name (already lower case, as [`read_client_hello`] gives it).
    pub fn route(&self, server_name: &str) -> Option<usize> {
        self.exact.get(server_name).copied().or_else(|| {
            self.suffixes.iter().find(|(suffix, _)| server_name.ends_with(suffix.as_str())).map(|(_, pool)| *pool)
        })
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn exact_then_longest_wildcard() {
        let mut routes = SniRoutes::default();
        routes.add("db.example.com", 1).unwrap();
        routes.add("*.example.com", 2).unwrap();
        routes.add("*.eu.example.com", 3).unwrap();
        routes.add("Mixed.Case.ORG", 4).unwrap();
        assert_eq!(routes.route("db.example.com"), Some(1));
        assert_eq!(routes.route("www.example.com"), Some(2));
        assert_eq!(routes.route("a.b.example.com"), Some(2));
        assert_eq!(routes.route("x.eu.example.com"), Some(3));
        assert_eq!(routes.route("example.com"), None, "a wildcard needs a label before it");
        assert_eq!(routes.route("badexample.com"), None);
        assert_eq!(routes.route("mixed.case.org"), Some(4));
    }

    #[test]
    fn bad_patterns() {
        let mut routes = SniRoutes::default();
        for bad in ["", "*", "*.", "a..b", "a b", "*.*.example.com", "ex*ample.com", ".example.com"] {
            assert!(routes.add(bad, 0).is_err(), "{bad:?}");
        }
        routes.add("a.example.com", 0).unwrap();
        assert!(routes.add("A.example.com", 1).unwrap_err().contains("twice"));
        routes.add("*.example.com", 0).unwrap();
        assert!(routes.add("*.Example.com", 1).unwrap_err().contains("twice"));
    }
}
