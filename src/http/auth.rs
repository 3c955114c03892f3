//! Who may write: HTTP Basic (several accepted pairs, so credentials rotate without downtime)
//! and/or a static secret header (an Infobip notification profile can send custom headers).
//!
//! When both are configured, either one suffices: an Infobip profile may be able to send only
//! one of them, and each alone is as strong as the secret behind it.
//!
//! The check runs as middleware in front of the `/email` handler, so it sees only the headers:
//! an unauthenticated sender is answered 401 before a byte of its body is read.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName};
use axum::middleware::Next;
use axum::response::Response;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use thiserror::Error;

use super::error::ApiError;
use crate::secret::{BasicCredential, Secret};

/// Standard base64, with or without padding: some HTTP clients leave it out.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a request was refused; logged, never echoed with any credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("no credentials")]
    Missing,
    #[error("malformed Authorization header")]
    Malformed,
    #[error("wrong credentials")]
    Wrong,
}

type Digest32 = [u8; 32];

/// The accepted credentials, kept only as SHA-256 digests so every comparison has the same
/// length and runs in constant time whatever the lengths of the secrets.
#[derive(Clone, Default)]
pub struct Auth {
    basic: Vec<Digest32>,
    header: Option<(HeaderName, Vec<Digest32>)>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("basic_pairs", &self.basic.len())
            .field("header", &self.header.as_ref().map(|(n, s)| (n, s.len())))
            .finish()
    }
}

fn digest(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// True when `candidate` equals any of `accepted`, looking at every one of them (no early exit),
/// so the time taken says nothing about which pair, if any, matched.
fn any_matches(accepted: &[Digest32], candidate: &Digest32) -> Choice {
    accepted
        .iter()
        .fold(Choice::from(0), |acc, d| acc | d.ct_eq(candidate))
}

impl Auth {
    /// Builds the checker from Basic pairs and, when `header` is set, its accepted secrets.
    pub fn new(basic: &[BasicCredential], header: Option<HeaderName>, secrets: &[Secret]) -> Self {
        Auth {
            basic: basic
                .iter()
                .map(|c| digest(format!("{}:{}", c.user, c.password.expose()).as_bytes()))
                .collect(),
            header: header.filter(|_| !secrets.is_empty()).map(|name| {
                (
                    name,
                    secrets
                        .iter()
                        .map(|s| digest(s.expose().as_bytes()))
                        .collect(),
                )
            }),
        }
    }

    /// True when no authentication is configured: anyone may post.
    pub fn is_open(&self) -> bool {
        self.basic.is_empty() && self.header.is_none()
    }

    /// True when HTTP Basic is accepted (a 401 then carries `WWW-Authenticate: Basic`).
    pub fn offers_basic(&self) -> bool {
        !self.basic.is_empty()
    }

    /// Warns loudly when anyone who can reach `addr` may write callbacks.
    pub fn warn_if_exposed(&self, addr: SocketAddr) {
        if self.is_open() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "NO AUTHENTICATION on a non-loopback address: anyone who can reach it can write \
                 callbacks; set --basic-auth or --auth-header/--auth-secret"
            );
        }
    }

    /// Accepts the request when it carries any accepted Basic pair or header secret.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.is_open() {
            return Ok(());
        }
        let mut ok = Choice::from(0);
        let mut presented = false;
        let mut malformed = false;
        if let Some((name, secrets)) = &self.header {
            for value in headers.get_all(name) {
                presented = true;
                ok |= any_matches(secrets, &digest(value.as_bytes()));
            }
        }
        if self.offers_basic() {
            if let Some(value) = headers.get(header::AUTHORIZATION) {
                presented = true;
                match basic_pair(value.as_bytes()) {
                    Some(pair) => ok |= any_matches(&self.basic, &digest(&pair)),
                    None => malformed = true,
                }
            }
        }
        if bool::from(ok) {
            Ok(())
        } else if malformed {
            Err(Refusal::Malformed)
        } else if presented {
            Err(Refusal::Wrong)
        } else {
            Err(Refusal::Missing)
        }
    }
}

/// The decoded `user:password` bytes of `Basic <base64>`, or `None` when it is not that form.
fn basic_pair(value: &[u8]) -> Option<Vec<u8>> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let pair = BASE64.decode(token.trim()).ok()?;
    pair.contains(&b':').then_some(pair)
}

/// Middleware for `/email`: refuses with 401 unless [`Auth::check`] passes.
pub async fn require(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    match auth.check(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(reason) => {
            // The reason only: never a header value, user name or password.
            tracing::info!(%reason, uri = %req.uri(), "unauthenticated request refused");
            axum::response::IntoResponse::into_response(ApiError::Unauthorized {
                basic: auth.offers_basic(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::str::FromStr;

    fn basic(user_pass: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Basic {}", BASE64.encode(user_pass))).expect("header")
    }

    fn creds(list: &[&str]) -> Vec<BasicCredential> {
        list.iter().map(|s| s.parse().expect("pair")).collect()
    }

    fn headers(pairs: &[(&str, HeaderValue)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_str(k).expect("name"), v.clone());
        }
        h
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c: BasicCredential = "infobip:hunter2".parse().expect("pair");
        let s: Secret = "s3cr3t-value".parse().expect("secret");
        let auth = Auth::new(
            std::slice::from_ref(&c),
            Some(HeaderName::from_static("x-webhook-secret")),
            std::slice::from_ref(&s),
        );
        let shown = format!("{c:?} {s:?} {auth:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn basic_accepts_every_configured_pair_and_nothing_else() {
        let auth = Auth::new(&creds(&["old:one", "new:two"]), None, &[]);
        let check = |v: HeaderValue| auth.check(&headers(&[("authorization", v)]));
        assert_eq!(check(basic("old:one")), Ok(()));
        assert_eq!(check(basic("new:two")), Ok(()));
        assert_eq!(check(basic("old:two")), Err(Refusal::Wrong));
        assert_eq!(check(basic("old:one ")), Err(Refusal::Wrong));
        // Scheme is case-insensitive; missing padding is tolerated.
        let token = BASE64.encode("new:two");
        let lower = HeaderValue::from_str(&format!("basic {}", token.trim_end_matches('=')))
            .expect("header");
        assert_eq!(check(lower), Ok(()));
        for bad in ["Basic", "Basic !!!", "Bearer abc", "Basic bm9jb2xvbg=="] {
            assert_eq!(
                check(HeaderValue::from_static(bad)),
                Err(Refusal::Malformed),
                "{bad}"
            );
        }
        assert_eq!(auth.check(&HeaderMap::new()), Err(Refusal::Missing));
    }

    #[test]
    fn header_secret_and_either_when_both() {
        let name = HeaderName::from_str("X-Webhook-Secret").expect("name");
        let secrets: Vec<Secret> = vec!["a".parse().expect("s"), "b".parse().expect("s")];
        let auth = Auth::new(&creds(&["u:p"]), Some(name), &secrets);
        let sec = |v: &'static str| ("x-webhook-secret", HeaderValue::from_static(v));
        assert_eq!(auth.check(&headers(&[sec("a")])), Ok(()));
        assert_eq!(auth.check(&headers(&[sec("b")])), Ok(()));
        assert_eq!(auth.check(&headers(&[sec("c")])), Err(Refusal::Wrong));
        assert_eq!(
            auth.check(&headers(&[("authorization", basic("u:p"))])),
            Ok(())
        );
        // Either suffices: a wrong one beside a right one does not refuse.
        assert_eq!(
            auth.check(&headers(&[sec("c"), ("authorization", basic("u:p"))])),
            Ok(())
        );
        assert!(!Auth::default().offers_basic());
        assert!(Auth::default().is_open());
        assert_eq!(Auth::default().check(&HeaderMap::new()), Ok(()));
    }
}
