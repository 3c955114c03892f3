//! Credentials as configuration values: parsed from flags and environment, compared by
//! `http::auth`, and never shown by `Debug` (so they cannot reach a log by accident).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself; only for comparing, never for logging.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = CredentialError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(CredentialError::EmptySecret);
        }
        Ok(Secret(s.to_owned()))
    }
}

/// One accepted HTTP Basic pair, written `USER:PASSWORD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicCredential {
    /// The user name (not secret: it may appear in `Debug`).
    pub user: String,
    /// The password.
    pub password: Secret,
}

impl FromStr for BasicCredential {
    type Err = CredentialError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // RFC 7617: the user id cannot contain a colon, the password can.
        let (user, password) = s.split_once(':').ok_or(CredentialError::NoColon)?;
        if user.is_empty() {
            return Err(CredentialError::EmptyUser);
        }
        if password.is_empty() {
            return Err(CredentialError::EmptyPassword);
        }
        Ok(BasicCredential {
            user: user.to_owned(),
            password: Secret(password.to_owned()),
        })
    }
}

/// Why a configured credential is unusable. The messages never echo the value.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("expected USER:PASSWORD, found no `:`")]
    NoColon,
    #[error("the user name before `:` is empty (expected USER:PASSWORD)")]
    EmptyUser,
    #[error("the password after `:` is empty (expected USER:PASSWORD)")]
    EmptyPassword,
    #[error("the secret is empty")]
    EmptySecret,
}

/// `url` with its password hidden, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_refuses_bad_ones() {
        let c: BasicCredential = "infobip:pa:ss".parse().expect("pair");
        assert_eq!(c.user, "infobip");
        assert_eq!(c.password.expose(), "pa:ss");
        assert_eq!(
            "nocolon".parse::<BasicCredential>(),
            Err(CredentialError::NoColon)
        );
        assert_eq!(
            ":pass".parse::<BasicCredential>(),
            Err(CredentialError::EmptyUser)
        );
        assert_eq!(
            "user:".parse::<BasicCredential>(),
            Err(CredentialError::EmptyPassword)
        );
        assert_eq!("".parse::<Secret>(), Err(CredentialError::EmptySecret));
    }
}
