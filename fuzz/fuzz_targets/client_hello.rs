//! The ClientHello reader on arbitrary bytes: never panics, and a server name it returns is
//! a lower-case host name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlb::admission::tls::{Hello, read_client_hello};

fuzz_target!(|data: &[u8]| {
    if let Ok(Hello::Complete { server_name: Some(name) }) = read_client_hello(data) {
        assert!(!name.is_empty() && name.len() <= 253);
        assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)));
    }
});
