//! Authentication: every `/v1` request carries `Authorization: Bearer <JWT>`; the user is the
//! token's `sub`. HS256 with a shared secret (the secret never appears in logs).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use ferry_protocol::ErrorCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::http::AppState;
use crate::http::error::ApiError;

/// Verifies and issues tokens.
#[derive(Clone)]
pub struct Auth {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth { secret: <redacted> }")
    }
}

/// Token claims Ferry reads. Other claims are kept for scopes (e.g. a `region` claim).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// Every other claim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct User {
    /// The user id (`sub`).
    pub id: String,
    /// All claims.
    pub claims: Claims,
}

/// Why the secret could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The secret file could not be read or created.
    #[error("JWT secret file {path}: {source}")]
    SecretFile {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The secret is too short to be safe.
    #[error("the JWT secret must be at least 32 bytes")]
    WeakSecret,
    /// A token could not be signed.
    #[error("cannot sign token: {0}")]
    Sign(String),
}

impl Auth {
    /// HS256 with the given shared secret.
    pub fn hs256(secret: &[u8]) -> Result<Auth, AuthError> {
        if secret.len() < 32 {
            return Err(AuthError::WeakSecret);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 30;
        validation.validate_nbf = true;
        Ok(Auth { decoding: DecodingKey::from_secret(secret), encoding: EncodingKey::from_secret(secret), validation })
    }

    /// The secret from `secret` if given, else from `file`, which is created with a random secret
    /// (readable only by its owner) if it does not exist — so a development server works out of
    /// the box and `ferry-server token` signs with the same secret.
    pub fn from_config(secret: Option<&str>, file: &Path) -> Result<Auth, AuthError> {
        if let Some(secret) = secret {
            return Auth::hs256(secret.as_bytes());
        }
        let io = |source| AuthError::SecretFile { path: file.display().to_string(), source };
        if !file.exists() {
            let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
            write_private(file, secret.as_bytes()).map_err(io)?;
            tracing::info!(path = %file.display(), "created a new JWT secret file");
        }
        let secret = std::fs::read_to_string(file).map_err(io)?;
        Auth::hs256(secret.trim().as_bytes())
    }

    /// Signs a token for `user` valid for `ttl`.
    pub fn issue(&self, user: &str, ttl: Duration) -> Result<String, AuthError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let claims = Claims { sub: user.to_string(), exp: (now + ttl).as_secs(), extra: Default::default() };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Sign(e.to_string()))
    }

    /// Verifies a bearer token.
    pub fn verify(&self, token: &str) -> Result<User, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            let why = match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::ImmatureSignature => "the token is not valid yet",
                ErrorKind::InvalidSignature => "the token's signature is invalid",
                ErrorKind::InvalidAlgorithm => "the token uses an algorithm this server does not accept",
                _ => "the token is malformed",
            };
            ApiError::new(ErrorCode::Unauthorized, why)
        })?;
        if data.claims.sub.is_empty() {
            return Err(ApiError::new(ErrorCode::Unauthorized, "the token has no subject (sub)"));
        }
        Ok(User { id: data.claims.sub.clone(), claims: data.claims })
    }
}

impl crate::store::feed::ClaimSource for User {
    fn claim(&self, name: &str) -> Option<ferry_protocol::Value> {
        use ferry_protocol::Value;
        if name == "sub" {
            return Some(Value::Text(self.id.clone()));
        }
        match self.claims.extra.get(name)? {
            serde_json::Value::String(s) => Some(Value::Text(s.clone())),
            serde_json::Value::Number(n) => n.as_i64().map(Value::Integer),
            _ => None,
        }
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "missing Authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "the Authorization header is not a bearer token"))?;
        state.auth.verify(token.trim())
    }
}

/// Parses a duration such as `90s`, `15m`, `1h`, `7d` (a bare number means seconds).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("invalid duration {text:?}: use e.g. 90s, 15m, 1h, 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("invalid duration unit in {text:?}: use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_forgeries_fail() {
        let auth = Auth::hs256(&[7u8; 32]).unwrap();
        let token = auth.issue("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&token).unwrap().id, "alice");
        let other = Auth::hs256(&[8u8; 32]).unwrap();
        assert_eq!(other.verify(&token).unwrap_err().0.code, ErrorCode::Unauthorized);
        assert!(auth.verify("not-a-token").is_err());
        assert!(Auth::hs256(b"short").is_err());
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
