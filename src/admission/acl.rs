//! Who may connect: a listener's `allow` and `deny` CIDR lists (IPv4 and IPv6).
//!
//! A connection is refused if its client address is in a `deny` entry, or if `allow` is not
//! empty and the address is in none of its entries; `deny` wins. IPv4 clients seen as
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) match IPv4 entries.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A network: an address with its host bits clear and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask32(u32::from(ip), self.prefix) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask128(u128::from(ip), self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn mask32(bits: u32, prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { bits & (u32::MAX << (32 - u32::from(prefix))) }
}

fn mask128(bits: u128, prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { bits & (u128::MAX << (128 - u32::from(prefix))) }
}

impl FromStr for Cidr {
    type Err = String;

    /// "10.0.0.0/8", "2001:db8::/32", or a single address ("192.0.2.7" = /32).
    fn from_str(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let ip: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address or network, e.g. \"10.0.0.0/8\" or \"2001:db8::/32\""))?;
        let ip = canonical(ip);
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(format!("{text:?} has a bad prefix length; use 0 to {max}")),
            },
        };
        let network = match ip {
            IpAddr::V4(v4) => IpAddr::V4(mask32(u32::from(v4), prefix).into()),
            IpAddr::V6(v6) => IpAddr::V6(mask128(u128::from(v6), prefix).into()),
        };
        if network != ip {
            return Err(format!("{text:?} has host bits set; did you mean \"{network}/{prefix}\"?"));
        }
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A listener's allow and deny lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRules {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

impl AccessRules {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.deny.iter().any(|c| c.contains(ip))
            && (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn matching() {
        assert!(cidr("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")), "families do not mix");
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(cidr("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!cidr("192.0.2.7").contains(ip("192.0.2.8")));
        assert!(cidr("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")), "IPv4-mapped");
        assert!(cidr("::/0").contains(ip("::1")));
    }

    #[test]
    fn parsing_errors_say_what_to_write() {
        assert!(Cidr::from_str("10.0.0.1/8").unwrap_err().contains("did you mean \"10.0.0.0/8\""));
        assert!(Cidr::from_str("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(Cidr::from_str("::/129").unwrap_err().contains("0 to 128"));
        assert!(Cidr::from_str("localhost").unwrap_err().contains("not an address"));
        assert!(Cidr::from_str("10.0.0.0/+8").is_err());
        assert_eq!(cidr(" 2001:db8::/32 ").to_string(), "2001:db8::/32");
    }

    #[test]
    fn rules() {
        let rules = AccessRules { allow: vec![cidr("10.0.0.0/8"), cidr("::1")], deny: vec![cidr("10.1.0.0/16")] };
        assert!(rules.permits(ip("10.2.3.4")));
        assert!(!rules.permits(ip("10.1.3.4")), "deny wins");
        assert!(!rules.permits(ip("192.0.2.1")), "not in allow");
        assert!(rules.permits(ip("::1")));
        let deny_only = AccessRules { allow: vec![], deny: vec![cidr("192.0.2.0/24")] };
        assert!(deny_only.permits(ip("198.51.100.1")));
        assert!(!deny_only.permits(ip("192.0.2.200")));
        assert!(AccessRules::default().permits(ip("192.0.2.200")));
    }

    proptest! {
        /// A network contains exactly the addresses that share its first `prefix` bits.
        #[test]
        fn contains_is_prefix_equality(net in any::<u32>(), prefix in 0u8..=32, probe in any::<u32>()) {
            let network = mask32(net, prefix);
            let c = Cidr { network: IpAddr::V4(network.into()), prefix };
            let same = prefix == 0 || (network ^ probe) >> (32 - u32::from(prefix)) == 0;
            prop_assert_eq!(c.contains(IpAddr::V4(probe.into())), same);
        }
    }
}
