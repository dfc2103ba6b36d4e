//! IPv4 prefix arithmetic for [`Cidr`] and [`IpBlock`].

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::model::{Cidr, IpBlock};

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

impl Cidr {
    /// Host bits are cleared, as `net.ParseCIDR` does for the API server; a prefix above
    /// 32 is taken as 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        Cidr { addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)), prefix }
    }

    pub fn host(addr: Ipv4Addr) -> Self {
        Cidr { addr, prefix: 32 }
    }

    pub fn contains_ip(&self, ip: Ipv4Addr) -> bool {
        let m = mask(self.prefix);
        u32::from(ip) & m == u32::from(self.addr) & m
    }

    /// Every address of `other` is in `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix && self.contains_ip(other.addr)
    }
}

impl IpBlock {
    pub fn contains_ip(&self, ip: Ipv4Addr) -> bool {
        self.cidr.contains_ip(ip) && !self.except.iter().any(|e| e.contains_ip(ip))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a string is not an IPv4 CIDR. `Ipv6` is separate because NetworkPolicies may
/// legitimately name IPv6 blocks, which an IPv4 datapath skips rather than rejects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("an IPv6 CIDR")]
    Ipv6,
    #[error("not a CIDR (want a.b.c.d/n with n at most 32)")]
    Invalid,
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = s.split_once('/').ok_or(CidrError::Invalid)?;
        if addr.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err(CidrError::Ipv6);
        }
        let addr: Ipv4Addr = addr.parse().map_err(|_| CidrError::Invalid)?;
        // Digits only: u8::from_str would also take "+8".
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::Invalid);
        }
        let prefix: u8 = prefix.parse().map_err(|_| CidrError::Invalid)?;
        if prefix > 32 {
            return Err(CidrError::Invalid);
        }
        Ok(Cidr::new(addr, prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_masks_host_bits_and_rejects_garbage() {
        assert_eq!(c("10.1.2.3/8"), Cidr { addr: ip("10.0.0.0"), prefix: 8 });
        assert_eq!(c("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(c("1.2.3.4/32").to_string(), "1.2.3.4/32");
        assert_eq!("fd00::/8".parse::<Cidr>(), Err(CidrError::Ipv6));
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0/8", "10.0.0.0/+8", "10.0.0.0/", "x/8", "10.0.0.0/008"] {
            assert_eq!(bad.parse::<Cidr>(), Err(CidrError::Invalid), "{bad}");
        }
    }

    #[test]
    fn containment() {
        assert!(c("0.0.0.0/0").contains_ip(ip("255.255.255.255")));
        assert!(c("10.0.0.0/8").contains_ip(ip("10.255.0.1")));
        assert!(!c("10.0.0.0/8").contains_ip(ip("11.0.0.0")));
        assert!(c("10.0.0.0/8").covers(&c("10.1.0.0/16")));
        assert!(c("10.0.0.0/8").covers(&c("10.0.0.0/8")));
        assert!(!c("10.1.0.0/16").covers(&c("10.0.0.0/8")));
        assert!(!c("10.0.0.0/8").covers(&c("11.0.0.0/16")));
    }

    #[test]
    fn ip_block_with_except() {
        let b = IpBlock { cidr: c("10.0.0.0/8"), except: vec![c("10.1.0.0/16"), c("10.2.3.0/24")] };
        assert!(b.contains_ip(ip("10.0.0.1")));
        assert!(!b.contains_ip(ip("10.1.200.1")));
        assert!(!b.contains_ip(ip("10.2.3.4")));
        assert!(b.contains_ip(ip("10.2.4.4")));
        assert!(!b.contains_ip(ip("192.168.0.1")));
    }
}
