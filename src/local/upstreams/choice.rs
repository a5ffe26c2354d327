//! Which remote-proxy a tunnel goes to: the balancing policies, as pure functions of the
//! user name, the remote list, and each remote's state.
//!
//! Sticky (the default) is rendezvous, or highest-random-weight, hashing (Thaler and Ravishankar,
//! 1998): each remote gets a weight from a hash of (user, remote) and a user's order is the
//! remotes by falling weight. The order depends only on the user name and the remote list,
//! so every local-proxy with the same list sends a user to the same remote, and a user's
//! bandwidth budget (held per remote-proxy) stays whole. When a remote goes down only the
//! users whose first choice it was move, each to their own second choice: about 1/n of
//! the users, where modulo hashing would move most of them. They move back when it returns.

pub use crate::config::Balance;

/// What the policy needs to know of one remote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The remote as configured (`HOST:PORT`): the rendezvous key, so every local-proxy
    /// with the same list agrees.
    pub name: &'a str,
    /// Up and not draining: may take new tunnels.
    pub usable: bool,
    /// Tunnels this local-proxy has open through it.
    pub open: usize,
}

/// The remotes to try for a tunnel of `user`, best first, usable ones only. `turn` is a
/// counter that round-robin advances once per tunnel.
pub fn order(balance: Balance, user: &str, remotes: &[Candidate<'_>], turn: usize) -> Vec<usize> {
    let usable = |&i: &usize| remotes[i].usable;
    let n = remotes.len();
    let mut all: Vec<usize> = match balance {
        Balance::Sticky => rendezvous(user, remotes.iter().map(|r| r.name)),
        Balance::LeastConnections => {
            let mut v: Vec<usize> = (0..n).collect();
            // Ties go to the next in turn, so idle remotes share the first tunnels.
            v.sort_by_key(|&i| (remotes[i].open, (i + n - turn % n.max(1)) % n.max(1)));
            v
        }
        Balance::RoundRobin => (0..n).map(|k| (turn + k) % n).collect(),
    };
    all.retain(usable);
    all
}

/// Indices of `names` by falling rendezvous weight for `user`.
pub fn rendezvous<'a>(user: &str, names: impl Iterator<Item = &'a str>) -> Vec<usize> {
    let mut weighted: Vec<(u64, usize)> = names
        .enumerate()
        .map(|(i, name)| (weight(user, name), i))
        .collect();
    // Highest weight first; equal weights (never in practice) by position, so the order is
    // total and the same everywhere.
    weighted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    weighted.into_iter().map(|(_, i)| i).collect()
}

/// The weight of `remote` for `user`: FNV-1a 64 over `user`, a 0 byte, and `remote`, then
/// the SplitMix64 finalizer to spread the bits. Fixed by this definition (never a seeded
/// hasher), so it is the same in every process and every version.
pub fn weight(user: &str, remote: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.bytes().chain([0u8]).chain(remote.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REMOTES: [&str; 3] = ["10.0.0.1:7080", "10.0.0.2:7080", "10.0.0.3:7080"];

    fn candidates(usable: [bool; 3], open: [usize; 3]) -> Vec<Candidate<'static>> {
        (0..3)
            .map(|i| Candidate {
                name: REMOTES[i],
                usable: usable[i],
                open: open[i],
            })
            .collect()
    }

    #[test]
    fn sticky_sends_a_user_to_one_remote_and_users_over_all() {
        let all = candidates([true; 3], [0; 3]);
        let first = order(Balance::Sticky, "alice", &all, 0)[0];
        for turn in 0..10 {
            assert_eq!(order(Balance::Sticky, "alice", &all, turn)[0], first);
        }
        let mut used = [0usize; 3];
        for u in 0..300 {
            used[order(Balance::Sticky, &format!("user{u}"), &all, 0)[0]] += 1;
        }
        // About a third each.
        assert!(used.iter().all(|&k| (70..=130).contains(&k)), "{used:?}");
    }

    #[test]
    fn when_a_remote_goes_down_only_its_users_move_and_they_come_back() {
        let all = candidates([true; 3], [0; 3]);
        let without_1 = candidates([true, false, true], [0; 3]);
        let mut moved = 0;
        for u in 0..300 {
            let name = format!("user{u}");
            let before = order(Balance::Sticky, &name, &all, 0);
            let after = order(Balance::Sticky, &name, &without_1, 0);
            if before[0] == 1 {
                // Its users go to their own second choice.
                assert_eq!(after[0], before[1], "{name}");
                moved += 1;
            } else {
                assert_eq!(after[0], before[0], "{name} moved though its remote is up");
            }
            assert_eq!(order(Balance::Sticky, &name, &all, 0), before);
        }
        assert!((70..=130).contains(&moved), "{moved} of 300 moved");
    }

    #[test]
    fn the_weight_is_fixed_by_its_definition() {
        // Pinned: every local-proxy, of any version, must compute the same order.
        assert_eq!(
            weight("alice", "10.0.0.1:7080"),
            weight("alice", "10.0.0.1:7080")
        );
        assert_ne!(
            weight("alice", "10.0.0.1:7080"),
            weight("alice", "10.0.0.2:7080")
        );
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
        // Computed independently from the definition above.
        assert_eq!(weight("alice", "10.0.0.1:7080"), 0xd34a_0654_5728_e9b5);
    }

    #[test]
    fn least_connections_and_round_robin_spread_one_user() {
        let open = candidates([true; 3], [5, 2, 9]);
        assert_eq!(order(Balance::LeastConnections, "alice", &open, 0)[0], 1);
        let idle = candidates([true; 3], [0; 3]);
        let firsts: Vec<usize> = (0..6)
            .map(|t| order(Balance::RoundRobin, "alice", &idle, t)[0])
            .collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        let firsts: Vec<usize> = (0..3)
            .map(|t| order(Balance::LeastConnections, "alice", &idle, t)[0])
            .collect();
        assert_eq!(firsts, vec![0, 1, 2]);
    }

    #[test]
    fn only_usable_remotes_are_tried_and_none_means_none() {
        for b in [
            Balance::Sticky,
            Balance::LeastConnections,
            Balance::RoundRobin,
        ] {
            let some = candidates([false, true, false], [0; 3]);
            assert_eq!(order(b, "alice", &some, 0), vec![1], "{b}");
            let none = candidates([false; 3], [0; 3]);
            assert!(order(b, "alice", &none, 0).is_empty(), "{b}");
        }
    }
}
