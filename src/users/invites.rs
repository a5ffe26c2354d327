//! Invite tokens for signup: `remote-proxy invite create` makes one, `local-proxy signup
//! --invite TOKEN` spends one use of it, and with `--signup-requires-invite` a signup
//! without a good token is refused.
//!
//! A token is 128 random bits, printed once when it is made; the store keeps only its
//! SHA-256, so a copy of the database hands out no signups. A fast hash is enough here
//! (argon2 is for passwords people choose, which can be guessed; 128 random bits cannot),
//! and it lets the store find a token by its hash.

use std::fmt;

/// What every token starts with, so one pasted in the wrong place is recognisable.
pub const TOKEN_PREFIX: &str = "fgi-";
/// Hex digits of a token's hash that name it in `invite list` and `invite revoke`.
pub const ID_LEN: usize = 12;

/// A stored invite. Holds no secret: only the hash's first digits name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invite {
    /// The first [`ID_LEN`] hex digits of the token's hash.
    pub id: String,
    /// Signups it still allows.
    pub uses_left: u32,
    /// When it stops working, seconds since the Unix epoch (`None`: never).
    pub expires_at: Option<i64>,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: i64,
}

/// Why a token did not allow a signup. The client is told only that a valid invite is
/// needed; the operator's log line says which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No invite has this token (never made, or revoked).
    Unknown,
    /// Its uses are spent.
    UsedUp,
    /// Past its expiry.
    Expired,
}

impl Refused {
    /// Why a token did not spend a use, from the invite it names: none, its uses left.
    pub fn for_invite(uses_left: Option<i64>) -> Refused {
        match uses_left {
            None => Refused::Unknown,
            Some(uses) if uses <= 0 => Refused::UsedUp,
            Some(_) => Refused::Expired,
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refused::Unknown => "unknown invite token",
            Refused::UsedUp => "invite used up",
            Refused::Expired => "invite expired",
        })
    }
}

/// A new random token, `fgi-` and 32 hex digits.
pub fn new_token() -> String {
    use rand_core::RngCore;
    let mut bytes = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex(&bytes))
}

/// The hash a token is stored and looked up by (SHA-256, hex).
pub fn token_hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes()).as_ref())
}

/// The id `invite list` shows for a stored hash.
pub fn id_of(hash: &str) -> String {
    hash.chars().take(ID_LEN).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_stored_only_as_their_hash() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(
            a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 32,
            "{a}"
        );
        let h = token_hash(&a);
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&a[TOKEN_PREFIX.len()..]));
        // Pasted with a stray newline, it is the same token.
        assert_eq!(token_hash(&format!("{a}\n")), h);
        assert_eq!(id_of(&h), h[..ID_LEN]);
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
