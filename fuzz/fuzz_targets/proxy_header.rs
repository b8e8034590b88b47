//! The PROXY header parser on arbitrary bytes: never panics, never claims more bytes than it
//! was given or than MAX_HEADER, and agrees with itself on every prefix of its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlb::admission::proxy_protocol::{MAX_HEADER, Parsed, encode, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Parsed::Complete(header)) => {
            assert!(header.len <= data.len() && header.len <= MAX_HEADER);
            // The header alone parses to the same thing.
            assert_eq!(parse(&data[..header.len]), Ok(Parsed::Complete(header)));
            // What was carried can be sent on.
            if let Some((src, dst)) = header.addresses {
                for version in [ringlb::admission::proxy_protocol::Version::V1, ringlb::admission::proxy_protocol::Version::V2] {
                    let again = encode(version, src, dst);
                    assert!(matches!(parse(again.as_bytes()), Ok(Parsed::Complete(_))));
                }
            }
        }
        Ok(Parsed::Incomplete) => assert!(data.len() < MAX_HEADER),
        Err(_) => {}
    }
});
