//! Lockstep's own signing keys (the SSF transmitter's SETs): generation (ES256 with ring,
//! RS256 with rsa), their public JWKs, and signing. Keys are kept in the database by
//! `sync::ssf_transmit`; this module only does the cryptography. A private key is held in a
//! [`SigningKey`] whose `Debug` prints no secret, and is never serialised.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// Algorithms Lockstep signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlg {
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (2048-bit keys).
    Rs256,
}

impl KeyAlg {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::Es256 => "ES256",
            KeyAlg::Rs256 => "RS256",
        }
    }

    /// Parses the JOSE name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ES256" => Some(KeyAlg::Es256),
            "RS256" => Some(KeyAlg::Rs256),
            _ => None,
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            KeyAlg::Es256 => Algorithm::ES256,
            KeyAlg::Rs256 => Algorithm::RS256,
        }
    }
}

/// Why a key could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// Generating a key failed.
    #[error("cannot generate a {0} key: {1}")]
    Generate(&'static str, String),
    /// A stored key is not usable.
    #[error("signing key {kid:?} is unusable: {reason}")]
    BadKey {
        /// Its id.
        kid: String,
        /// Why.
        reason: String,
    },
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A private signing key with its public JWK. `Debug` redacts the private half.
#[derive(Clone)]
pub struct SigningKey {
    /// Key id.
    pub kid: String,
    /// Algorithm.
    pub alg: KeyAlg,
    /// The public key as a JWK (`kid`, `alg`, `use` = `sig`).
    pub public_jwk: Value,
    /// Generated (epoch ms).
    pub created_at: i64,
    /// Replaced by a newer key (epoch ms).
    pub retired_at: Option<i64>,
    private_der: Vec<u8>,
    encoding: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl SigningKey {
    /// A new random key of `alg`, created now.
    pub fn generate(alg: KeyAlg, now_ms: i64) -> Result<Self, SigningError> {
        let kid = format!(
            "{}-{}",
            alg.as_str().to_ascii_lowercase(),
            uuid::Uuid::now_v7().simple()
        );
        let (der, jwk) = match alg {
            KeyAlg::Es256 => generate_es256()?,
            KeyAlg::Rs256 => generate_rs256()?,
        };
        Self::from_parts(kid, alg, der, jwk, now_ms, None)
    }

    /// A key from its stored parts (the JWK gets `kid`, `alg` and `use` here).
    pub fn from_parts(
        kid: String,
        alg: KeyAlg,
        private_der: Vec<u8>,
        mut public_jwk: Value,
        created_at: i64,
        retired_at: Option<i64>,
    ) -> Result<Self, SigningError> {
        let encoding = match alg {
            KeyAlg::Es256 => EncodingKey::from_ec_der(&private_der),
            KeyAlg::Rs256 => EncodingKey::from_rsa_der(&private_der),
        };
        if let Some(obj) = public_jwk.as_object_mut() {
            obj.insert("kid".into(), Value::String(kid.clone()));
            obj.insert("alg".into(), Value::String(alg.as_str().into()));
            obj.insert("use".into(), Value::String("sig".into()));
        } else {
            return Err(SigningError::BadKey {
                kid,
                reason: "the public JWK is not a JSON object".into(),
            });
        }
        let key = SigningKey {
            kid,
            alg,
            public_jwk,
            created_at,
            retired_at,
            private_der,
            encoding,
        };
        // A key that cannot sign is refused when loaded, not at its first event.
        key.sign("probe", &json!({}))?;
        Ok(key)
    }

    /// The private key's DER, for the database only.
    pub fn private_der(&self) -> &[u8] {
        &self.private_der
    }

    /// A compact JWS of `claims` with this key, header `typ` and `kid`.
    pub fn sign(&self, typ: &str, claims: &Value) -> Result<String, SigningError> {
        let mut header = Header::new(self.alg.jwt());
        header.typ = Some(typ.to_owned());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| SigningError::Sign(e.to_string()))
    }
}

impl SigningKey {
    /// A key the operator supplies as a PEM file: PKCS#8 (`PRIVATE KEY`, EC P-256 or RSA) or
    /// PKCS#1 (`RSA PRIVATE KEY`); the algorithm follows from the key (ES256 or RS256, RSA of
    /// at least 2048 bits).
    pub fn from_pem(kid: String, pem: &str) -> Result<Self, SigningError> {
        let bad = |reason: String| SigningError::BadKey {
            kid: kid.clone(),
            reason,
        };
        let (label, der) = pem_block(pem).map_err(bad)?;
        let (alg, private_der, jwk) = match label.as_str() {
            "PRIVATE KEY" => match es256_from_pkcs8(&der) {
                Some(jwk) => (KeyAlg::Es256, der, jwk),
                None => {
                    use rsa::pkcs8::DecodePrivateKey;
                    let key = rsa::RsaPrivateKey::from_pkcs8_der(&der)
                        .map_err(|_| bad("a PKCS#8 key that is neither EC P-256 nor RSA".into()))?;
                    rs256_parts(&key).map_err(bad)?
                }
            },
            "RSA PRIVATE KEY" => {
                use rsa::pkcs1::DecodeRsaPrivateKey;
                let key = rsa::RsaPrivateKey::from_pkcs1_der(&der)
                    .map_err(|e| bad(format!("not a PKCS#1 RSA key: {e}")))?;
                rs256_parts(&key).map_err(bad)?
            }
            "EC PRIVATE KEY" => {
                return Err(bad("SEC1 EC keys are not read; convert it to PKCS#8 \
                     (openssl pkcs8 -topk8 -nocrypt -in key.pem -out key.p8.pem)"
                    .into()));
            }
            "ENCRYPTED PRIVATE KEY" => {
                return Err(bad(
                    "the key is encrypted; give it unencrypted (mode 0600)".into()
                ));
            }
            other => return Err(bad(format!("a PEM {other:?} block is not a private key"))),
        };
        Self::from_parts(kid, alg, private_der, jwk, 0, None)
    }
}

/// The first PEM block of `text`: its label and decoded body.
fn pem_block(text: &str) -> Result<(String, Vec<u8>), String> {
    use base64::engine::general_purpose::STANDARD;
    let start = text
        .find("-----BEGIN ")
        .ok_or_else(|| "no PEM block (-----BEGIN ...-----)".to_owned())?;
    let rest = &text[start + "-----BEGIN ".len()..];
    let (label, rest) = rest
        .split_once("-----")
        .ok_or_else(|| "a malformed PEM header".to_owned())?;
    let end = format!("-----END {label}-----");
    let body = rest
        .find(&end)
        .map(|i| &rest[..i])
        .ok_or_else(|| format!("no {end} line"))?;
    let b64: String = body.split_whitespace().collect();
    let der = STANDARD
        .decode(b64)
        .map_err(|e| format!("the PEM body is not base64: {e}"))?;
    Ok((label.to_owned(), der))
}

/// The public JWK of a PKCS#8 EC P-256 key, or None if `der` is not one.
fn es256_from_pkcs8(der: &[u8]) -> Option<Value> {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng).ok()?;
    ec_jwk(pair.public_key().as_ref()).ok()
}

/// An RSA key as RS256 parts: PKCS#1 DER (what the signer takes) and the public JWK.
fn rs256_parts(key: &rsa::RsaPrivateKey) -> Result<(KeyAlg, Vec<u8>, Value), String> {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    if key.size() < 256 {
        return Err(format!(
            "an RSA key of {} bits; at least 2048 are required",
            key.size() * 8
        ));
    }
    let der = key.to_pkcs1_der().map_err(|e| e.to_string())?;
    Ok((KeyAlg::Rs256, der.as_bytes().to_vec(), rsa_jwk(key)))
}

fn rsa_jwk(key: &rsa::RsaPrivateKey) -> Value {
    use rsa::traits::PublicKeyParts;
    json!({
        "kty": "RSA",
        "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    })
}

/// The JWK of an uncompressed P-256 point (0x04 || x || y).
fn ec_jwk(point: &[u8]) -> Result<Value, &'static str> {
    if point.len() != 65 {
        return Err("unexpected public key length");
    }
    Ok(json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    }))
}

fn generate_es256() -> Result<(Vec<u8>, Value), SigningError> {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let fail = |e: &dyn std::fmt::Display| SigningError::Generate("ES256", e.to_string());
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|e| fail(&e))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|e| fail(&e))?;
    let jwk = ec_jwk(pair.public_key().as_ref()).map_err(|e| fail(&e))?;
    Ok((pkcs8.as_ref().to_vec(), jwk))
}

fn generate_rs256() -> Result<(Vec<u8>, Value), SigningError> {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    let fail = |e: &dyn std::fmt::Display| SigningError::Generate("RS256", e.to_string());
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).map_err(|e| fail(&e))?;
    let der = key.to_pkcs1_der().map_err(|e| fail(&e))?;
    let jwk = rsa_jwk(&key);
    Ok((der.as_bytes().to_vec(), jwk))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_keys_sign_tokens_their_public_jwk_verifies_and_debug_hides_the_secret() {
        for alg in [KeyAlg::Es256, KeyAlg::Rs256] {
            let key = SigningKey::generate(alg, 1).unwrap();
            let jwt = key.sign("secevent+jwt", &json!({"iss": "x"})).unwrap();
            let jwk: jsonwebtoken::jwk::Jwk =
                serde_json::from_value(key.public_jwk.clone()).unwrap();
            let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
            let mut v = jsonwebtoken::Validation::new(alg.jwt());
            v.required_spec_claims.clear();
            v.validate_exp = false;
            let data = jsonwebtoken::decode::<Value>(&jwt, &decoding, &v).unwrap();
            assert_eq!(data.claims["iss"], "x");
            assert_eq!(data.header.kid.as_deref(), Some(key.kid.as_str()));
            let shown = format!("{key:?}");
            assert!(shown.contains("<redacted>"));
            assert!(!key.public_jwk.to_string().contains("\"d\""));
            // Stored and loaded again, it is the same key.
            let again = SigningKey::from_parts(
                key.kid.clone(),
                alg,
                key.private_der().to_vec(),
                key.public_jwk.clone(),
                1,
                None,
            )
            .unwrap();
            assert_eq!(again.public_jwk, key.public_jwk);
        }
    }

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/../tests/fixtures/oidc/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(path).unwrap()
    }

    /// A configured key signs SETs that its own public PEM verifies (read by jsonwebtoken,
    /// not by the JWK derived here), and that the published JWK verifies too.
    #[test]
    fn configured_pem_keys_sign_what_their_public_keys_verify() {
        for (name, alg) in [("test-ec-a", KeyAlg::Es256), ("test-rsa-a", KeyAlg::Rs256)] {
            let key = SigningKey::from_pem(format!("kid-{name}"), &fixture(&format!("{name}.pem")))
                .unwrap();
            assert_eq!(key.alg, alg, "{name}");
            let jwt = key.sign("secevent+jwt", &json!({"iss": "x"})).unwrap();
            let public = fixture(&format!("{name}.pub.pem"));
            let by_pem = match alg {
                KeyAlg::Es256 => jsonwebtoken::DecodingKey::from_ec_pem(public.as_bytes()),
                KeyAlg::Rs256 => jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()),
            }
            .unwrap();
            let jwk: jsonwebtoken::jwk::Jwk =
                serde_json::from_value(key.public_jwk.clone()).unwrap();
            let by_jwk = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
            let mut v = jsonwebtoken::Validation::new(alg.jwt());
            v.required_spec_claims.clear();
            v.validate_exp = false;
            for decoding in [&by_pem, &by_jwk] {
                let data = jsonwebtoken::decode::<Value>(&jwt, decoding, &v).unwrap();
                assert_eq!(
                    data.header.kid.as_deref(),
                    Some(format!("kid-{name}").as_str())
                );
            }
            assert!(!format!("{key:?}").contains(&fixture(&format!("{name}.pem"))[30..60]));
        }
    }

    #[test]
    fn unusable_pem_files_are_refused_with_the_reason() {
        let refused = |pem: &str| match SigningKey::from_pem("k".into(), pem) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted {pem:?}"),
        };
        assert!(refused("").contains("no PEM block"));
        assert!(refused(&fixture("test-rsa-a.pub.pem")).contains("not a private key"));
        assert!(
            refused("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")
                .contains("PKCS#8")
        );
        assert!(
            refused("-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n")
                .contains("base64")
        );
        assert!(
            refused("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .contains("neither EC P-256 nor RSA")
        );
        let small = {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
            use base64::engine::general_purpose::STANDARD;
            let der = key.to_pkcs8_der().unwrap();
            format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                STANDARD.encode(der.as_bytes())
            )
        };
        assert!(refused(&small).contains("at least 2048"));
    }
}
