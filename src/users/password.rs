//! argon2id password hashing and verification.

use super::Error;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// Hashes a password with argon2id and a random salt (PHC string form).
pub fn hash_password(password: &str) -> Result<String, Error> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Hash(e.to_string()))
}

/// Full argon2 check of `password` against a PHC string; false for a malformed hash.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Hashes a new password like [`hash_password`], computing in `memory` (grown as needed and
/// kept by the caller), so signups share the bounded working memory logins use.
///
/// # Errors
/// `Hash` when argon2 refuses (cannot happen with the default parameters).
pub fn hash_password_with(password: &str, memory: &mut Vec<Block>) -> Result<String, Error> {
    use argon2::password_hash::{Output, ParamsString};
    let fail = |e: &dyn std::fmt::Display| Error::Hash(e.to_string());
    let salt = SaltString::generate(&mut OsRng);
    let argon = Argon2::default();
    let params = argon.params().clone();
    let count = params.block_count();
    if memory.len() < count {
        memory.resize(count, Block::default());
    }
    let mut raw_salt = [0u8; 64];
    let raw_salt = salt
        .as_salt()
        .decode_b64(&mut raw_salt)
        .map_err(|e| fail(&e))?;
    let mut out = vec![0u8; params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN)];
    argon
        .hash_password_into_with_memory(
            password.as_bytes(),
            raw_salt,
            &mut out,
            &mut memory[..count],
        )
        .map_err(|e| fail(&e))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| fail(&e))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| fail(&e))?),
    };
    Ok(phc.to_string())
}

/// Most argon2 memory a stored hash may ask for, in KiB (1 GiB): a hash with absurd
/// parameters is refused rather than allowed to exhaust memory.
const MAX_HASH_KIB: u32 = 1 << 20;

/// Full argon2 check like [`verify_password`], computing in `memory` (grown as needed and
/// kept by the caller for the next check).
pub fn verify_password_with(password: &str, phc: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Some(salt), Some(expected)) = (
        Algorithm::try_from(parsed.algorithm),
        parsed.salt,
        parsed.hash,
    ) else {
        return false;
    };
    let version = parsed
        .version
        .and_then(|v| Version::try_from(v).ok())
        .unwrap_or_default();
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    if params.m_cost() > MAX_HASH_KIB {
        return false;
    }
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let count = params.block_count();
    if memory.len() < count {
        memory.resize(count, Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params);
    if argon
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..count])
        .is_err()
    {
        return false;
    }
    ct_eq(&out, expected.as_bytes())
}

/// Compares two byte strings in time independent of where they differ (the lengths, which
/// are not secret here, may show).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare_agrees_with_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn a_hash_made_in_reused_memory_verifies_like_one_made_fresh() {
        let mut mem = Vec::new();
        let phc = hash_password_with("secret", &mut mem).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        assert!(verify_password("secret", &phc));
        assert!(!verify_password("other", &phc));
        let again = hash_password_with("secret", &mut mem).unwrap();
        assert_ne!(again, phc, "a fresh salt each time");
        assert!(verify_password_with("secret", &again, &mut mem));
    }

    #[test]
    fn reusable_memory_check_agrees_with_the_reference() {
        let phc = hash_password("right").unwrap();
        let mut mem = Vec::new();
        assert!(verify_password_with("right", &phc, &mut mem));
        assert!(verify_password("right", &phc));
        assert!(!verify_password_with("wrong", &phc, &mut mem));
        assert!(!verify_password_with("right", "not a hash", &mut mem));
        // Reused memory still gives the right answer.
        assert!(verify_password_with("right", &phc, &mut mem));
    }
}
