//! The PROXY protocol (HAProxy's spec, versions 1 and 2): the header a proxy puts before the
//! client's bytes to tell the next hop who the client is.
//!
//! [`encode`] builds the header ringlb sends to backends (`send_proxy`). [`parse`] reads the
//! header a front load balancer sends (`accept_proxy`): it looks at no more than
//! [`MAX_HEADER`] bytes, says `Incomplete` until it has the whole header, decides as early as
//! it can that bytes are not a header at all, and never panics on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature: "\r\n\r\n\0\r\nQUIT\n".
pub const V2_SIGNATURE: [u8; 12] = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];
/// The longest v1 header the spec allows, CRLF included.
pub const V1_MAX: usize = 107;
/// The most v2 address and TLV bytes accepted after the 16-byte fixed part.
pub const V2_MAX_PAYLOAD: usize = 2048;
/// The most bytes [`parse`] ever needs to see.
pub const MAX_HEADER: usize = 16 + V2_MAX_PAYLOAD;

/// Which version to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header took; the client's own bytes start after them.
    pub len: usize,
    /// The client and the address it connected to, or `None` when the sender has none to
    /// give (v1 UNKNOWN, v2 LOCAL or an unspecified family): use the connection's own.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed (and may still make a valid header).
    Incomplete,
    Complete(Header),
}

/// Why bytes are not a usable header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header")]
    BadV1,
    #[error("PROXY v1 header longer than 107 bytes")]
    V1TooLong,
    #[error("unsupported PROXY v2 version or command")]
    BadV2Command,
    #[error("PROXY v2 header longer than {MAX_HEADER} bytes")]
    V2TooLong,
    #[error("PROXY v2 address block shorter than its family needs")]
    V2ShortAddresses,
}

/// Reads a v1 or v2 header from the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ParseError> {
    let v2_prefix = buf.len().min(V2_SIGNATURE.len());
    if buf[..v2_prefix] == V2_SIGNATURE[..v2_prefix] && !buf.is_empty() {
        return parse_v2(buf);
    }
    let v1_prefix = buf.len().min(6);
    if buf[..v1_prefix] == b"PROXY "[..v1_prefix] {
        return if buf.is_empty() { Ok(Parsed::Incomplete) } else { parse_v1(buf) };
    }
    Err(ParseError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ParseError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX { Err(ParseError::V1TooLong) } else { Ok(Parsed::Incomplete) };
    };
    let line = std::str::from_utf8(&window[..end]).map_err(|_| ParseError::BadV1)?;
    let len = end + 2;
    let mut fields = line.split(' ');
    if fields.next() != Some("PROXY") {
        return Err(ParseError::BadV1);
    }
    let family = fields.next().ok_or(ParseError::BadV1)?;
    if family == "UNKNOWN" {
        // Whatever follows UNKNOWN is to be ignored.
        return Ok(Parsed::Complete(Header { len, addresses: None }));
    }
    let want_v4 = match family {
        "TCP4" => true,
        "TCP6" => false,
        _ => return Err(ParseError::BadV1),
    };
    let rest: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = rest[..] else { return Err(ParseError::BadV1) };
    let ip = |text: &str| -> Result<IpAddr, ParseError> {
        let ip: IpAddr = text.parse().map_err(|_| ParseError::BadV1)?;
        if ip.is_ipv4() == want_v4 { Ok(ip) } else { Err(ParseError::BadV1) }
    };
    let port = |text: &str| -> Result<u16, ParseError> {
        if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::BadV1);
        }
        text.parse().map_err(|_| ParseError::BadV1)
    };
    let source = SocketAddr::new(ip(src)?, port(sport)?);
    let destination = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Parsed::Complete(Header { len, addresses: Some((source, destination)) }))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ParseError> {
    if buf.len() < 16 {
        // The signature so far matched; the version byte, once here, must be 2.
        if buf.len() > 12 && buf[12] >> 4 != 2 {
            return Err(ParseError::BadV2Command);
        }
        return Ok(Parsed::Incomplete);
    }
    let version_command = buf[12];
    let family = buf[13];
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if version_command >> 4 != 2 || version_command & 0x0f > 1 {
        return Err(ParseError::BadV2Command);
    }
    if payload > V2_MAX_PAYLOAD {
        return Err(ParseError::V2TooLong);
    }
    let len = 16 + payload;
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let block = &buf[16..len];
    let local = version_command & 0x0f == 0;
    let addresses = match family {
        // TCP over IPv4, then IPv6; anything else (UNSPEC, UDP, UNIX) carries no TCP client.
        0x11 => {
            let b: &[u8; 12] = block.get(..12).and_then(|b| b.try_into().ok()).ok_or(ParseError::V2ShortAddresses)?;
            let src = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let dst = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Some((
                SocketAddr::new(src.into(), u16::from_be_bytes([b[8], b[9]])),
                SocketAddr::new(dst.into(), u16::from_be_bytes([b[10], b[11]])),
            ))
        }
        0x21 => {
            let b: &[u8; 36] = block.get(..36).and_then(|b| b.try_into().ok()).ok_or(ParseError::V2ShortAddresses)?;
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&b[..16]);
            dst.copy_from_slice(&b[16..32]);
            Some((
                SocketAddr::new(Ipv6Addr::from(src).into(), u16::from_be_bytes([b[32], b[33]])),
                SocketAddr::new(Ipv6Addr::from(dst).into(), u16::from_be_bytes([b[34], b[35]])),
            ))
        }
        _ => None,
    };
    // LOCAL: the front balancer's own connection (e.g. its health check); no client to carry.
    Ok(Parsed::Complete(Header { len, addresses: if local { None } else { addresses } }))
}

/// An encoded header, kept inline so sending it needs no allocation.
#[derive(Clone, Copy)]
pub struct Encoded {
    bytes: [u8; V1_MAX],
    len: u8,
}

impl Encoded {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// Builds the header for a client at `source` that connected to `destination`. If the two are
/// of different families (an IPv4 client on an IPv6 listener cannot happen with ringlb's
/// IPV6_V6ONLY listeners, but a front balancer could report one), IPv4 is mapped into IPv6.
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Encoded {
    let (source, destination) = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (source, destination),
        _ => (to_v6(source), to_v6(destination)),
    };
    let mut out = Encoded { bytes: [0; V1_MAX], len: 0 };
    let mut put = |data: &[u8]| {
        let at = out.len as usize;
        out.bytes[at..at + data.len()].copy_from_slice(data);
        out.len += data.len() as u8;
    };
    match version {
        Version::V1 => {
            use std::io::Write;
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            let mut line = [0u8; V1_MAX];
            let mut cursor = std::io::Cursor::new(&mut line[..]);
            // At most 104 bytes for two IPv6 addresses: always fits.
            let _ = write!(
                cursor,
                "PROXY {family} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            );
            let n = cursor.position() as usize;
            put(&line[..n]);
        }
        Version::V2 => {
            put(&V2_SIGNATURE);
            match (source, destination) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    put(&[0x21, 0x11, 0, 12]);
                    put(&s.ip().octets());
                    put(&d.ip().octets());
                }
                (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                    put(&[0x21, 0x21, 0, 36]);
                    put(&s.ip().octets());
                    put(&d.ip().octets());
                }
                _ => unreachable!("families were made equal above"),
            }
            put(&source.port().to_be_bytes());
            put(&destination.port().to_be_bytes());
        }
    }
    out
}

fn to_v6(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn v1_bytes_on_the_wire() {
        let h = encode(Version::V1, addr("192.0.2.1:56324"), addr("198.51.100.7:443"));
        assert_eq!(h.as_bytes(), b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n");
        let h = encode(Version::V1, addr("[2001:db8::1]:1"), addr("[::1]:65535"));
        assert_eq!(h.as_bytes(), b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n");
        let longest = encode(
            Version::V1,
            addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        );
        assert_eq!(longest.as_bytes().len(), 104, "the spec's worst case");
    }

    #[test]
    fn v2_bytes_on_the_wire() {
        let h = encode(Version::V2, addr("192.0.2.1:56324"), addr("198.51.100.7:443"));
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c, 192, 0, 2, 1, 198, 51, 100, 7, 0xdc, 0x04, 0x01, 0xbb]);
        assert_eq!(h.as_bytes(), &expected[..]);
        let h = encode(Version::V2, addr("[2001:db8::1]:1"), addr("[::1]:2"));
        let b = h.as_bytes();
        assert_eq!(b.len(), 16 + 36);
        assert_eq!(&b[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(&b[16..32], &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&b[32..48], &Ipv6Addr::LOCALHOST.octets());
        assert_eq!(&b[48..52], &[0, 1, 0, 2]);
    }

    #[test]
    fn mixed_families_are_mapped_to_ipv6() {
        let h = encode(Version::V1, addr("192.0.2.1:1"), addr("[::1]:2"));
        assert_eq!(h.as_bytes(), b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n");
    }

    #[test]
    fn parses_v1() {
        let text = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\nGET /";
        let Ok(Parsed::Complete(h)) = parse(text) else { panic!() };
        assert_eq!(h.len, text.len() - 5);
        assert_eq!(h.addresses, Some((addr("192.0.2.1:56324"), addr("198.51.100.7:443"))));
        let Ok(Parsed::Complete(h)) = parse(b"PROXY UNKNOWN ignored stuff\r\n") else { panic!() };
        assert_eq!(h.addresses, None);
        let Ok(Parsed::Complete(h)) = parse(b"PROXY TCP6 ::1 ::2 1 2\r\n") else { panic!() };
        assert_eq!(h.addresses, Some((addr("[::1]:1"), addr("[::2]:2"))));
    }

    #[test]
    fn rejects_bad_v1() {
        for bad in [
            &b"PROXY TCP4 ::1 ::2 1 2\r\n"[..],
            b"PROXY TCP6 1.2.3.4 1.2.3.5 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.5 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2 3\r\n",
            b"PROXY TCP4  1.2.3.4 1.2.3.5 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 1.2.3.5 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.5 +1 2\r\n",
        ] {
            assert_eq!(parse(bad), Err(ParseError::BadV1), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(&[b'P'; 20]), Err(ParseError::NotProxy));
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(200, b'1');
        assert_eq!(parse(&long), Err(ParseError::V1TooLong));
    }

    #[test]
    fn tells_early_that_bytes_are_no_header() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ParseError::NotProxy));
        assert_eq!(parse(&[0x16, 0x03, 0x01]), Err(ParseError::NotProxy), "a TLS ClientHello");
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
        assert_eq!(parse(&V2_SIGNATURE[..5]), Ok(Parsed::Incomplete));
        assert_eq!(parse(b""), Ok(Parsed::Incomplete));
    }

    #[test]
    fn parses_v2_local_and_tlvs() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&local), Ok(Parsed::Complete(Header { len: 16, addresses: None })));
        // PROXY over IPv4 with a 7-byte TLV after the addresses: the TLV is skipped.
        let mut with_tlv = encode(Version::V2, addr("10.0.0.1:1"), addr("10.0.0.2:2")).as_bytes().to_vec();
        with_tlv[15] = 12 + 7;
        with_tlv.extend_from_slice(&[0x01, 0x00, 0x04, b'h', b'2', b'x', b'y']);
        with_tlv.extend_from_slice(b"client bytes");
        let Ok(Parsed::Complete(h)) = parse(&with_tlv) else { panic!() };
        assert_eq!(h.len, 16 + 19);
        assert_eq!(h.addresses, Some((addr("10.0.0.1:1"), addr("10.0.0.2:2"))));
    }

    #[test]
    fn rejects_bad_v2() {
        let good = encode(Version::V2, addr("10.0.0.1:1"), addr("10.0.0.2:2")).as_bytes().to_vec();
        let mut bad_version = good.clone();
        bad_version[12] = 0x11;
        assert_eq!(parse(&bad_version), Err(ParseError::BadV2Command));
        assert_eq!(parse(&bad_version[..13]), Err(ParseError::BadV2Command), "known from the 13th byte");
        let mut short = good.clone();
        short[15] = 4;
        short.truncate(20);
        assert_eq!(parse(&short), Err(ParseError::V2ShortAddresses));
        let mut huge = good.clone();
        huge[14] = 0xff;
        assert_eq!(parse(&huge), Err(ParseError::V2TooLong));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// What we send, we read back, at every split point.
        #[test]
        fn round_trips(v2 in any::<bool>(), v4 in any::<bool>(), a in any::<u128>(), b in any::<u128>(), p in any::<u16>(), q in any::<u16>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let (src, dst) = if v4 {
                (SocketAddr::new(Ipv4Addr::from(a as u32).into(), p), SocketAddr::new(Ipv4Addr::from(b as u32).into(), q))
            } else {
                (SocketAddr::new(Ipv6Addr::from(a).into(), p), SocketAddr::new(Ipv6Addr::from(b).into(), q))
            };
            let encoded = encode(if v2 { Version::V2 } else { Version::V1 }, src, dst);
            let mut bytes = encoded.as_bytes().to_vec();
            let header_len = bytes.len();
            bytes.extend_from_slice(&tail);
            for cut in 0..header_len {
                prop_assert_eq!(parse(&bytes[..cut]), Ok(Parsed::Incomplete));
            }
            prop_assert_eq!(parse(&bytes), Ok(Parsed::Complete(Header { len: header_len, addresses: Some((src, dst)) })));
        }

        /// Any bytes: no panic, and a complete header never claims more than it was given
        /// or more than MAX_HEADER.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), sig in any::<bool>()) {
            let mut input = if sig { V2_SIGNATURE.to_vec() } else { b"PROXY ".to_vec() };
            input.extend_from_slice(&bytes);
            for data in [&bytes[..], &input[..]] {
                if let Ok(Parsed::Complete(h)) = parse(data) {
                    prop_assert!(h.len <= data.len() && h.len <= MAX_HEADER);
                }
            }
        }
    }
}
