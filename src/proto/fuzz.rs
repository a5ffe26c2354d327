//! Property tests of every parser in proto/: arbitrary and mutated-valid input, fed whole and
//! in random-sized pieces, never panics, never buffers past the documented caps, and either
//! parses to the same message both ways or fails both ways.
//!
//! `cargo test` runs a modest number of cases; `PROPTEST_CASES=100000 cargo test --lib
//! proto::fuzz` runs many more (README, "Fuzzing").

#[cfg(test)]
mod properties {
    use crate::proto::addr::TargetAddr;
    use crate::proto::{http, socks5, tunnel};
    use proptest::prelude::*;
    use std::io::{self, Read};
    use std::net::SocketAddr;

    /// Cases per property: 256, or `PROPTEST_CASES`.
    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256)
    }

    /// A reader that hands out `data` in pieces of the given sizes (cycling; 0 counts as 1).
    struct Pieces<'a> {
        data: &'a [u8],
        sizes: &'a [usize],
        turn: usize,
    }

    impl Read for Pieces<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let want = self
                .sizes
                .get(self.turn % self.sizes.len().max(1))
                .copied()
                .unwrap_or(1);
            self.turn += 1;
            let n = want.max(1).min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn pieces<'a>(data: &'a [u8], sizes: &'a [usize]) -> Pieces<'a> {
        Pieces {
            data,
            sizes,
            turn: 0,
        }
    }

    fn target() -> impl Strategy<Value = TargetAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), 1..=u16::MAX)
                .prop_map(|(ip, p)| TargetAddr::Ip(SocketAddr::from((ip, p)))),
            (any::<[u8; 16]>(), 1..=u16::MAX).prop_map(|(ip, p)| {
                TargetAddr::Ip(SocketAddr::from((std::net::Ipv6Addr::from(ip), p)))
            }),
            (
                "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z]{2,10}){0,3}",
                1..=u16::MAX
            )
                .prop_map(|(h, p)| TargetAddr::Domain(h, p)),
        ]
    }

    fn tunnel_request() -> impl Strategy<Value = tunnel::Request> {
        (
            "[A-Za-z0-9._@-]{1,64}",
            "[ -~]{1,255}",
            target(),
            any::<u64>(),
            any::<bool>(),
            // A signup (with or without an invite token) instead of a connect.
            prop::option::of(prop::option::of("[ -~]{1,255}")),
        )
            .prop_map(|(user, password, target, id, v2, signup)| {
                let (command, target, invite) = match signup {
                    Some(invite) => (tunnel::Command::Signup, None, invite),
                    None => (tunnel::Command::Connect, Some(target), None),
                };
                tunnel::Request {
                    command,
                    tunnel_id: v2.then_some(tunnel::TunnelId(id)),
                    user,
                    password,
                    target,
                    invite,
                }
            })
    }

    /// A well-formed proxy request head: CONNECT or absolute-form, with a few headers.
    fn http_head() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just("CONNECT"), Just("GET"), Just("POST")],
            "[a-z]{1,10}\\.[a-z]{2,5}",
            1..=u16::MAX,
            prop::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,40}"), 0..8),
        )
            .prop_map(|(method, host, port, headers)| {
                let target = if method == "CONNECT" {
                    format!("{host}:{port}")
                } else {
                    format!("http://{host}:{port}/p")
                };
                let mut s = format!("{method} {target} HTTP/1.1\r\n");
                for (n, v) in headers {
                    s.push_str(&format!("{n}: {v}\r\n"));
                }
                s.push_str("\r\n");
                s
            })
    }

    /// `valid` with one byte replaced.
    fn mutated(valid: Vec<u8>, at: usize, byte: u8) -> Vec<u8> {
        let mut v = valid;
        if !v.is_empty() {
            let i = at % v.len();
            v[i] = byte;
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        #[test]
        fn tunnel_requests_roundtrip_whole_and_in_pieces(
            req in tunnel_request(),
            sizes in prop::collection::vec(1usize..40, 1..8),
        ) {
            let bytes = tunnel::encode_request(&req).unwrap();
            prop_assert!(bytes.len() <= 4 + 8 + 1 + 255 + 1 + 255 + 1 + 1 + 255 + 2);
            let whole = tunnel::read_request(&mut &bytes[..]).unwrap();
            let split = tunnel::read_request(&mut pieces(&bytes, &sizes)).unwrap();
            prop_assert_eq!(&whole, &req);
            prop_assert_eq!(&split, &req);
        }

        #[test]
        fn tunnel_input_never_panics_and_pieces_agree(
            data in prop::collection::vec(any::<u8>(), 0..600),
            valid in tunnel_request(),
            at in any::<usize>(),
            byte in any::<u8>(),
            sizes in prop::collection::vec(1usize..40, 1..8),
        ) {
            let m = mutated(tunnel::encode_request(&valid).unwrap(), at, byte);
            for input in [&data, &m] {
                let whole = tunnel::read_request(&mut &input[..]);
                let split = tunnel::read_request(&mut pieces(input, &sizes));
                prop_assert_eq!(whole.ok(), split.ok());
                let _ = tunnel::read_reply(&mut &input[..]);
                let _ = tunnel::read_check_bandwidth(&mut &input[..]);
            }
        }

        #[test]
        fn tunnel_replies_roundtrip(
            status in 0u8..=0x14,
            retry in any::<u16>(),
            bound in target(),
            v2 in any::<bool>(),
        ) {
            let bound = match bound {
                TargetAddr::Ip(a) => a,
                TargetAddr::Domain(_, p) => SocketAddr::from(([0, 0, 0, 0], p)),
            };
            let status = tunnel::Status::try_from(status).unwrap();
            let reply = tunnel::Reply {
                status,
                retry_after: retry,
                bound,
                resets_at: if status == tunnel::Status::QuotaExceeded { i64::from(retry) << 20 } else { 0 },
            };
            let version = if v2 { tunnel::VERSION } else { tunnel::VERSION_1 };
            let bytes = tunnel::encode_reply(&reply, version);
            prop_assert_eq!(tunnel::read_reply(&mut &bytes[..]).unwrap(), reply);
        }

        #[test]
        fn socks5_input_never_panics_and_pieces_agree(
            data in prop::collection::vec(any::<u8>(), 0..600),
            sizes in prop::collection::vec(1usize..20, 1..8),
        ) {
            let g = (socks5::read_greeting(&mut &data[..]).ok(),
                     socks5::read_greeting(&mut pieces(&data, &sizes)).ok());
            prop_assert_eq!(g.0, g.1);
            let u = (socks5::read_userpass(&mut &data[..]).ok(),
                     socks5::read_userpass(&mut pieces(&data, &sizes)).ok());
            prop_assert_eq!(u.0, u.1);
            let r = (socks5::read_request(&mut &data[..]).ok().map(|r| r.target),
                     socks5::read_request(&mut pieces(&data, &sizes)).ok().map(|r| r.target));
            prop_assert_eq!(r.0, r.1);
        }

        #[test]
        fn socks5_requests_parse_to_their_target(
            t in target(),
            at in any::<usize>(),
            byte in any::<u8>(),
            sizes in prop::collection::vec(1usize..20, 1..8),
        ) {
            let mut bytes = vec![5u8, 1, 0];
            t.encode(&mut bytes);
            let got = socks5::read_request(&mut pieces(&bytes, &sizes)).unwrap();
            prop_assert_eq!(got.target, t);
            let m = mutated(bytes, at, byte);
            let _ = socks5::read_request(&mut &m[..]);
        }

        #[test]
        fn http_heads_parse_the_same_whole_and_in_pieces(
            head in http_head(),
            tail in prop::collection::vec(any::<u8>(), 0..64),
            sizes in prop::collection::vec(1usize..64, 1..8),
        ) {
            let mut bytes = head.clone().into_bytes();
            bytes.extend_from_slice(&tail);
            let (len, whole) = http::try_parse_head(&bytes).unwrap().unwrap();
            prop_assert_eq!(len, head.len());
            let mut buf = Vec::new();
            let (len2, split) = http::read_head(&mut pieces(&bytes, &sizes), &mut buf).unwrap();
            prop_assert_eq!(len2, len);
            prop_assert_eq!(&split, &whole);
            // What followed the head is still there for the relay.
            prop_assert_eq!(&buf[len2..], &bytes[len2..buf.len()]);
            let _ = http::interpret(&whole);
            let _ = http::proxy_credentials(&whole);
        }

        #[test]
        fn http_input_never_panics_or_buffers_past_the_cap(
            data in prop::collection::vec(any::<u8>(), 0..2000),
            valid in http_head(),
            at in any::<usize>(),
            byte in any::<u8>(),
            sizes in prop::collection::vec(1usize..600, 1..8),
        ) {
            let m = mutated(valid.into_bytes(), at, byte);
            for input in [&data, &m] {
                if let Ok(Some((_, head))) = http::try_parse_head(input) {
                    let _ = http::interpret(&head);
                    let _ = http::proxy_credentials(&head);
                }
                let mut buf = Vec::new();
                let _ = http::read_head(&mut pieces(input, &sizes), &mut buf);
                prop_assert!(buf.len() <= http::MAX_HEAD + 4096);
            }
        }
    }

    #[test]
    fn an_endless_head_is_cut_at_the_cap() {
        // 1 MiB of header bytes with no blank line: refused once past MAX_HEAD.
        let endless = b"GET http://x/ HTTP/1.1\r\n"
            .iter()
            .copied()
            .chain(std::iter::repeat_n(b'a', 1 << 20))
            .collect::<Vec<u8>>();
        let mut buf = Vec::new();
        let e = http::read_head(&mut &endless[..], &mut buf).unwrap_err();
        assert_eq!(e.status(), Some(431));
        assert!(buf.len() <= http::MAX_HEAD + 4096, "{}", buf.len());
    }
}
