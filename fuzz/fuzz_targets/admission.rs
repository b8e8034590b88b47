//! The whole routing decision (PROXY header, then ClientHello) on arbitrary bytes: never
//! panics, and never skips more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlb::admission::{Admission, Step};
use ringlb::admission::tls::SniRoutes;

fuzz_target!(|data: &[u8]| {
    let mut sni = SniRoutes::default();
    sni.add("db.example.com", 1).unwrap();
    sni.add("*.example.com", 2).unwrap();
    for (accept_proxy, default_pool) in [(true, Some(0)), (true, None), (false, None)] {
        let admission = Admission { accept_proxy, sni: sni.clone(), default_pool };
        for full in [false, true] {
            if let Step::Route { skip, .. } = admission.examine(data, full) {
                assert!(skip <= data.len());
            }
        }
    }
});
