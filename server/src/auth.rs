//! Authentication: every `/v1` request carries `Authorization: Bearer <JWT>`; the user is the
//! token's `sub`, and the other claims feed scopes. Tokens are verified with a shared secret
//! (HS256) and/or an identity provider's public key (PEM or JWKS: EdDSA, RS*, PS*, ES*), with
//! `exp`/`nbf` always and `aud`/`iss` when configured. Secrets never appear in logs.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use ferry_protocol::ErrorCode;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthArgs;
use crate::http::AppState;
use crate::http::error::ApiError;

/// Verifies (and, with a shared secret, issues) tokens.
#[derive(Clone)]
pub struct Auth {
    /// HS256 signing key, when a shared secret is configured.
    signer: Option<EncodingKey>,
    verifiers: Vec<Verifier>,
    audience: Option<String>,
    issuer: Option<String>,
}

/// One key that may verify tokens.
#[derive(Clone)]
struct Verifier {
    /// Only tokens naming this `kid` (JWKS keys); `None` accepts any `kid`.
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("hs256", &self.signer.is_some())
            .field("keys", &self.verifiers.len())
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
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
    /// Tokens can only be issued with a shared secret.
    #[error("no JWT secret is configured: set FERRY_JWT_SECRET to issue development tokens")]
    NoSecret,
    /// A key file could not be read.
    #[error("key file {path}: {source}")]
    KeyFile {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key file holds no usable public key.
    #[error("{0} holds no usable public key (PEM Ed25519/RSA/EC, or a JWKS document)")]
    BadKey(String),
}

impl Auth {
    /// HS256 with the given shared secret.
    pub fn hs256(secret: &[u8]) -> Result<Auth, AuthError> {
        let mut auth = Auth { signer: None, verifiers: Vec::new(), audience: None, issuer: None };
        auth.add_secret(secret)?;
        Ok(auth)
    }

    fn add_secret(&mut self, secret: &[u8]) -> Result<(), AuthError> {
        if secret.len() < 32 {
            return Err(AuthError::WeakSecret);
        }
        self.signer = Some(EncodingKey::from_secret(secret));
        self.verifiers.push(Verifier {
            kid: None,
            algorithms: vec![Algorithm::HS256],
            key: DecodingKey::from_secret(secret),
        });
        Ok(())
    }

    /// Builds verification from configuration. HS256 is on when a secret is given, or when no
    /// identity-provider key is configured — then the secret comes from `jwt_secret_file`, which
    /// is created with a random secret (readable only by its owner) if missing, so a development
    /// server works out of the box and `ferry-server token` signs with the same secret.
    pub fn from_args(args: &AuthArgs) -> Result<Auth, AuthError> {
        let mut auth = Auth {
            signer: None,
            verifiers: Vec::new(),
            audience: args.jwt_audience.clone(),
            issuer: args.jwt_issuer.clone(),
        };
        if let Some(path) = &args.jwt_public_key {
            let pem = std::fs::read(path)
                .map_err(|source| AuthError::KeyFile { path: path.display().to_string(), source })?;
            auth.verifiers
                .push(public_key_verifier(&pem).ok_or_else(|| AuthError::BadKey(path.display().to_string()))?);
        }
        if let Some(path) = &args.jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| AuthError::KeyFile { path: path.display().to_string(), source })?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|_| AuthError::BadKey(path.display().to_string()))?;
            for jwk in &set.keys {
                auth.verifiers.push(jwk_verifier(jwk).ok_or_else(|| AuthError::BadKey(path.display().to_string()))?);
            }
        }
        if let Some(secret) = &args.jwt_secret {
            auth.add_secret(secret.as_bytes())?;
        } else if auth.verifiers.is_empty() {
            let file = &args.jwt_secret_file;
            let io = |source| AuthError::SecretFile { path: file.display().to_string(), source };
            if !file.exists() {
                let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
                write_private(file, secret.as_bytes()).map_err(io)?;
                tracing::info!(path = %file.display(), "created a new JWT secret file");
            }
            let secret = std::fs::read_to_string(file).map_err(io)?;
            auth.add_secret(secret.trim().as_bytes())?;
        }
        Ok(auth)
    }

    /// Signs an HS256 token for `user` valid for `ttl` (development tokens).
    pub fn issue(&self, user: &str, ttl: Duration) -> Result<String, AuthError> {
        let signer = self.signer.as_ref().ok_or(AuthError::NoSecret)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut extra = serde_json::Map::new();
        if let Some(aud) = &self.audience {
            extra.insert("aud".into(), aud.clone().into());
        }
        if let Some(iss) = &self.issuer {
            extra.insert("iss".into(), iss.clone().into());
        }
        let claims = Claims { sub: user.to_string(), exp: (now + ttl).as_secs(), extra };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, signer)
            .map_err(|e| AuthError::Sign(e.to_string()))
    }

    /// Verifies a bearer token: signature by a configured key for the token's algorithm (and
    /// `kid`), `exp`, `nbf`, and `aud`/`iss` when configured.
    pub fn verify(&self, token: &str) -> Result<User, ApiError> {
        let unauthorized = |why: &str| ApiError::new(ErrorCode::Unauthorized, why);
        let header = jsonwebtoken::decode_header(token).map_err(|_| unauthorized("the token is malformed"))?;
        let mut last = "the token uses an algorithm or key this server does not accept";
        for verifier in &self.verifiers {
            let kid_ok = match (&verifier.kid, &header.kid) {
                (Some(want), Some(got)) => want == got,
                (Some(_), None) => false,
                (None, _) => true,
            };
            if !kid_ok || !verifier.algorithms.contains(&header.alg) {
                continue;
            }
            let mut validation = Validation::new(header.alg);
            validation.leeway = 30;
            validation.validate_nbf = true;
            // A configured audience or issuer must be present, not only right when present.
            let mut required = vec!["exp", "sub"];
            match &self.audience {
                Some(aud) => {
                    validation.set_audience(&[aud]);
                    required.push("aud");
                }
                None => validation.validate_aud = false,
            }
            if let Some(iss) = &self.issuer {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            validation.set_required_spec_claims(&required);
            match jsonwebtoken::decode::<Claims>(token, &verifier.key, &validation) {
                Ok(data) => {
                    if data.claims.sub.is_empty() {
                        return Err(unauthorized("the token has no subject (sub)"));
                    }
                    return Ok(User { id: data.claims.sub.clone(), claims: data.claims });
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => "the token has expired",
                        ErrorKind::ImmatureSignature => "the token is not valid yet",
                        ErrorKind::InvalidSignature => "the token's signature is invalid",
                        ErrorKind::InvalidAudience => "the token is for another audience",
                        ErrorKind::InvalidIssuer => "the token is from another issuer",
                        ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim",
                        _ => "the token is malformed",
                    };
                }
            }
        }
        Err(unauthorized(last))
    }
}

/// A verifier for a PEM public key: Ed25519 (EdDSA), RSA (RS*/PS*) or EC (ES256/ES384).
fn public_key_verifier(pem: &[u8]) -> Option<Verifier> {
    let text = std::str::from_utf8(pem).ok()?;
    let (key, algorithms) = if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        (key, vec![Algorithm::EdDSA])
    } else if text.contains("RSA") || DecodingKey::from_rsa_pem(pem).is_ok() && !text.contains("EC ") {
        let key = DecodingKey::from_rsa_pem(pem).ok()?;
        let rsa = [
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ];
        (key, rsa.to_vec())
    } else {
        (DecodingKey::from_ec_pem(pem).ok()?, vec![Algorithm::ES256, Algorithm::ES384])
    };
    Some(Verifier { kid: None, algorithms, key })
}

/// A verifier for one JWKS key (its `alg`, or the usual one for its key type).
fn jwk_verifier(jwk: &Jwk) -> Option<Verifier> {
    use jsonwebtoken::jwk::AlgorithmParameters;
    let key = DecodingKey::from_jwk(jwk).ok()?;
    let alg = match jwk.common.key_algorithm {
        Some(alg) => Algorithm::try_from(alg).ok()?,
        None => match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
            AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            _ => return None,
        },
    };
    Some(Verifier { kid: jwk.common.key_id.clone(), algorithms: vec![alg], key })
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

    fn claims(sub: &str, exp_offset: i64, extra: serde_json::Value) -> serde_json::Value {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let mut c = serde_json::json!({"sub": sub, "exp": now + exp_offset});
        if let (Some(c), serde_json::Value::Object(extra)) = (c.as_object_mut(), extra) {
            c.extend(extra);
        }
        c
    }

    fn message(r: Result<User, ApiError>) -> String {
        r.unwrap_err().0.message
    }

    #[test]
    fn identity_provider_keys_audience_and_issuer_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let idp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let public = dir.path().join("idp.pem");
        std::fs::write(&public, idp.public_key_pem()).unwrap();
        let signing = EncodingKey::from_ed_pem(idp.serialize_pem().as_bytes()).unwrap();
        let args = AuthArgs {
            jwt_public_key: Some(public),
            jwt_audience: Some("ferry".into()),
            jwt_issuer: Some("https://idp.example".into()),
            jwt_secret_file: dir.path().join("never-created"),
            ..AuthArgs::secret("unused-unused-unused-unused-unused")
        };
        let args = AuthArgs { jwt_secret: None, ..args };
        let auth = Auth::from_args(&args).unwrap();
        assert!(!dir.path().join("never-created").exists(), "no dev secret when an IdP key is configured");
        let sign = |c: serde_json::Value| jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &c, &signing).unwrap();
        let good =
            claims("alice", 600, serde_json::json!({"aud": "ferry", "iss": "https://idp.example", "region": "north"}));
        let user = auth.verify(&sign(good)).unwrap();
        assert_eq!(user.id, "alice");
        use crate::store::feed::ClaimSource as _;
        assert_eq!(user.claim("region"), Some(ferry_protocol::Value::Text("north".into())));
        let wrong_aud = claims("alice", 600, serde_json::json!({"aud": "other", "iss": "https://idp.example"}));
        assert!(message(auth.verify(&sign(wrong_aud))).contains("audience"));
        let wrong_iss = claims("alice", 600, serde_json::json!({"aud": "ferry", "iss": "https://evil.example"}));
        assert!(message(auth.verify(&sign(wrong_iss))).contains("issuer"));
        // A configured claim must be present, not only right when present.
        let no_aud = claims("alice", 600, serde_json::json!({"iss": "https://idp.example"}));
        assert!(message(auth.verify(&sign(no_aud))).contains("required claim"));
        let no_iss = claims("alice", 600, serde_json::json!({"aud": "ferry"}));
        assert!(message(auth.verify(&sign(no_iss))).contains("required claim"));
        let expired = claims("alice", -3600, serde_json::json!({"aud": "ferry", "iss": "https://idp.example"}));
        assert!(message(auth.verify(&sign(expired))).contains("expired"));
        // Algorithm confusion: an HS256 token is refused when only the IdP's key is trusted.
        let hs = Auth::hs256(&[1u8; 32]).unwrap().issue("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&hs).unwrap_err().0.code, ErrorCode::Unauthorized);
        // An unsigned token ("alg": "none") is refused.
        let none = format!("eyJhbGciOiJub25lIn0.{}.", "eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0");
        assert!(auth.verify(&none).is_err());
        // A development token cannot be issued without a secret.
        assert!(matches!(auth.issue("alice", Duration::from_secs(1)), Err(AuthError::NoSecret)));
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid() {
        let dir = tempfile::tempdir().unwrap();
        let idp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let signing = EncodingKey::from_ed_pem(idp.serialize_pem().as_bytes()).unwrap();
        // An OKP key as an identity provider publishes it (RFC 8037): x = base64url(raw public key).
        let x = base64url(idp.public_key_raw());
        let jwks = dir.path().join("jwks.json");
        let set = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "alg": "EdDSA", "kid": "k1"}]});
        std::fs::write(&jwks, set.to_string()).unwrap();
        let args = AuthArgs { jwks_file: Some(jwks), jwt_secret: None, ..AuthArgs::secret("x") };
        let auth = Auth::from_args(&args).unwrap();
        let token = |kid: &str| {
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some(kid.into());
            jsonwebtoken::encode(&header, &claims("bob", 600, serde_json::json!({})), &signing).unwrap()
        };
        assert_eq!(auth.verify(&token("k1")).unwrap().id, "bob");
        assert!(auth.verify(&token("k2")).is_err());
    }

    fn base64url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
