//! Where a tunnel may go (remote-proxy's destination policy): remote-proxy connects only to addresses this policy passes, so a
//! user cannot reach the server's own network, loopback services, cloud metadata, or the
//! proxy itself.
//!
//! Pure: addresses in, a verdict out; the caller resolves a name once and connects only to
//! the addresses that passed (never re-resolving, so a DNS answer that changes between check
//! and connect cannot get through). Precedence, first match wins: remote-proxy's own
//! listening sockets, `--deny-port`, `--deny-dest`, `--allow-dest`, the built-in deny list;
//! anything else passes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// An address range, `ADDR/PREFIX` (a bare address is a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    const fn v4(a: [u8; 4], prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let s = segments;
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(
                s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
            )),
            prefix,
        }
    }

    /// True when `ip` is in the range (an IPv4 range never holds an IPv6 address: unwrap
    /// mapped forms first, [`canonical`]).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `fc00::/7`, or a single address (`127.0.0.1` = `/32`, `::1` = `/128`).
    /// Bits set past the prefix are refused: `10.0.0.1/8` is most likely a typo.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{s:?} is not an address range ({why}); e.g. 10.0.0.0/8");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim_matches(['[', ']'])
            .parse()
            .map_err(|_| bad("address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| bad("prefix"))?,
            None => max,
        };
        let c = Cidr { addr, prefix };
        let base = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        if base != addr {
            return Err(bad(&format!(
                "host bits set; did you mean {base}/{prefix}?"
            )));
        }
        Ok(c)
    }
}

/// Ranges no tunnel may reach unless `--allow-dest` opens them: this host, private and
/// shared networks, link-local (cloud metadata at 169.254.169.254), benchmarking,
/// multicast, reserved and broadcast.
pub const DEFAULT_DENY: [Cidr; 16] = [
    Cidr::v4([0, 0, 0, 0], 8),
    Cidr::v4([127, 0, 0, 0], 8),
    Cidr::v4([10, 0, 0, 0], 8),
    Cidr::v4([172, 16, 0, 0], 12),
    Cidr::v4([192, 168, 0, 0], 16),
    Cidr::v4([100, 64, 0, 0], 10),
    Cidr::v4([169, 254, 0, 0], 16),
    Cidr::v4([192, 0, 0, 0], 24),
    Cidr::v4([198, 18, 0, 0], 15),
    Cidr::v4([224, 0, 0, 0], 4),
    Cidr::v4([240, 0, 0, 0], 4),
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
    Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
];

/// The address a connection to `ip` really reaches: IPv4-mapped (`::ffff:a.b.c.d`) and
/// IPv4-compatible (`::a.b.c.d`) IPv6 addresses are the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            let compatible = s[..6].iter().all(|&x| x == 0) && (s[6] != 0 || s[7] > 1);
            if compatible {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            ip
        }
        v4 => v4,
    }
}

/// Why an address was refused: the rule, for the log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// One of remote-proxy's own listening sockets (never allowed: a loop).
    OwnListener(SocketAddr),
    /// `--deny-port`.
    DeniedPort(u16),
    /// `--deny-dest`.
    Denied(Cidr),
    /// The built-in deny list.
    Default(Cidr),
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::OwnListener(a) => write!(f, "remote-proxy's own listener {a}"),
            Rule::DeniedPort(p) => write!(f, "--deny-port {p}"),
            Rule::Denied(c) => write!(f, "--deny-dest {c}"),
            Rule::Default(c) => write!(f, "default deny {c} (open with --allow-dest)"),
        }
    }
}

/// The destination policy of one remote-proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `--allow-dest` ranges, opened in the default deny list.
    pub allow: Vec<Cidr>,
    /// `--deny-dest` ranges, refused even when allowed.
    pub deny: Vec<Cidr>,
    /// `--deny-port` ports.
    pub deny_ports: Vec<u16>,
    /// remote-proxy's own sockets: each listening address, and when one listens on the
    /// unspecified address, this host's addresses with that port.
    pub own: Vec<SocketAddr>,
}

impl Policy {
    /// The rule that refuses `addr`, or `None` when a tunnel may go there.
    pub fn refuses(&self, addr: SocketAddr) -> Option<Rule> {
        let ip = canonical(addr.ip());
        let port = addr.port();
        if let Some(own) = self
            .own
            .iter()
            .find(|o| o.port() == port && canonical(o.ip()) == ip)
        {
            return Some(Rule::OwnListener(*own));
        }
        if self.deny_ports.contains(&port) {
            return Some(Rule::DeniedPort(port));
        }
        if let Some(c) = self.deny.iter().find(|c| c.contains(ip)) {
            return Some(Rule::Denied(*c));
        }
        if self.allow.iter().any(|c| c.contains(ip)) {
            return None;
        }
        DEFAULT_DENY
            .iter()
            .find(|c| c.contains(ip))
            .map(|c| Rule::Default(*c))
    }

    /// The addresses of a resolved target that pass, in the resolver's order; when none
    /// does, the rule that refused the first.
    ///
    /// # Errors
    /// The first address's rule when every address is refused.
    pub fn filter(&self, addrs: &[SocketAddr]) -> Result<Vec<SocketAddr>, Rule> {
        let mut first = None;
        let passed: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| match self.refuses(*a) {
                None => true,
                Some(rule) => {
                    first.get_or_insert(rule);
                    false
                }
            })
            .collect();
        match (passed.is_empty(), first) {
            (true, Some(rule)) => Err(rule),
            _ => Ok(passed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn refused(p: &Policy, s: &str) -> bool {
        p.refuses(sa(s)).is_some()
    }

    #[test]
    fn every_default_range_is_refused_at_both_edges_and_open_just_outside() {
        let p = Policy::default();
        // (first address, last address, just below, just above) of each IPv4 range.
        let v4 = [
            ("0.0.0.0", "0.255.255.255", None, Some("1.0.0.0")),
            (
                "127.0.0.0",
                "127.255.255.255",
                Some("126.255.255.255"),
                Some("128.0.0.0"),
            ),
            (
                "10.0.0.0",
                "10.255.255.255",
                Some("9.255.255.255"),
                Some("11.0.0.0"),
            ),
            (
                "172.16.0.0",
                "172.31.255.255",
                Some("172.15.255.255"),
                Some("172.32.0.0"),
            ),
            (
                "192.168.0.0",
                "192.168.255.255",
                Some("192.167.255.255"),
                Some("192.169.0.0"),
            ),
            (
                "100.64.0.0",
                "100.127.255.255",
                Some("100.63.255.255"),
                Some("100.128.0.0"),
            ),
            (
                "169.254.0.0",
                "169.254.255.255",
                Some("169.253.255.255"),
                Some("169.255.0.0"),
            ),
            (
                "192.0.0.0",
                "192.0.0.255",
                Some("191.255.255.255"),
                Some("192.0.1.0"),
            ),
            (
                "198.18.0.0",
                "198.19.255.255",
                Some("198.17.255.255"),
                Some("198.20.0.0"),
            ),
            (
                "224.0.0.0",
                "239.255.255.255",
                Some("223.255.255.255"),
                None,
            ),
            ("240.0.0.0", "255.255.255.255", None, None),
        ];
        for (lo, hi, below, above) in v4 {
            assert!(refused(&p, &format!("{lo}:80")), "{lo}");
            assert!(refused(&p, &format!("{hi}:80")), "{hi}");
            for open in [below, above].into_iter().flatten() {
                assert!(!refused(&p, &format!("{open}:80")), "{open}");
            }
        }
        assert!(refused(&p, "169.254.169.254:80"), "cloud metadata");
        for v6 in [
            "[::]:80",
            "[::1]:80",
            "[fe80::]:80",
            "[febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:80",
            "[fc00::]:80",
            "[fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:80",
            "[ff00::]:80",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:80",
        ] {
            assert!(refused(&p, v6), "{v6}");
        }
        for open in [
            "[::1:0:0:1]:80",
            "[fec0::]:80",
            "[fe7f::]:80",
            "[fbff::]:80",
            "[2001:db8::1]:80",
        ] {
            assert!(!refused(&p, open), "{open}");
        }
        assert!(!refused(&p, "93.184.216.34:443"));
    }

    #[test]
    fn mapped_and_compatible_ipv6_forms_are_judged_as_the_ipv4_they_carry() {
        let p = Policy::default();
        for s in [
            "[::ffff:127.0.0.1]:80",
            "[::ffff:10.1.2.3]:80",
            "[::ffff:169.254.169.254]:80",
            "[::127.0.0.1]:80",
            "[::192.168.1.1]:80",
        ] {
            assert!(refused(&p, s), "{s}");
        }
        assert!(!refused(&p, "[::ffff:93.184.216.34]:80"));
        assert_eq!(
            canonical("::ffff:1.2.3.4".parse().unwrap()),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // :: and ::1 stay IPv6 (unspecified and loopback), refused as such.
        assert!(canonical("::1".parse().unwrap()).is_ipv6());
        // ::2 is IPv4-compatible 0.0.0.2: this host.
        assert!(refused(&p, "[::2]:80"));
        assert!(refused(&p, "[::1]:80"));
    }

    #[test]
    fn allow_opens_exactly_its_range_and_deny_and_ports_win_over_it() {
        let p = Policy {
            allow: vec![
                "127.0.0.1/32".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
            deny: vec!["10.1.2.0/24".parse().unwrap()],
            deny_ports: vec![25],
            own: vec![sa("127.0.0.1:7080")],
        };
        assert!(!refused(&p, "127.0.0.1:80"));
        assert!(!refused(&p, "[::ffff:127.0.0.1]:80"));
        assert!(refused(&p, "127.0.0.2:80"));
        assert!(!refused(&p, "10.1.9.9:80"));
        assert_eq!(
            p.refuses(sa("10.1.2.3:80")),
            Some(Rule::Denied("10.1.2.0/24".parse().unwrap()))
        );
        assert_eq!(p.refuses(sa("127.0.0.1:25")), Some(Rule::DeniedPort(25)));
        assert_eq!(p.refuses(sa("8.8.8.8:25")), Some(Rule::DeniedPort(25)));
        // Its own listener stays refused although 127.0.0.1/32 is allowed.
        assert_eq!(
            p.refuses(sa("127.0.0.1:7080")),
            Some(Rule::OwnListener(sa("127.0.0.1:7080")))
        );
        assert!(refused(&p, "[::ffff:127.0.0.1]:7080"));
    }

    #[test]
    fn a_name_passes_only_through_its_allowed_addresses_in_order() {
        let p = Policy::default();
        let addrs = [sa("10.0.0.1:80"), sa("93.184.216.34:80"), sa("1.1.1.1:80")];
        assert_eq!(
            p.filter(&addrs).unwrap(),
            vec![sa("93.184.216.34:80"), sa("1.1.1.1:80")]
        );
        let all_bad = [sa("127.0.0.1:80"), sa("[::1]:80")];
        assert_eq!(
            p.filter(&all_bad),
            Err(Rule::Default("127.0.0.0/8".parse().unwrap()))
        );
    }

    #[test]
    fn ranges_parse_strictly() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "127.0.0.1".parse::<Cidr>().unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert_eq!(
            "[fc00::]/7".parse::<Cidr>().unwrap().to_string(),
            "fc00::/7"
        );
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "::/129",
            "x/8",
            "",
            "10.0.0.0/",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
    }
}
