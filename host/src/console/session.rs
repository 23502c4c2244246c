//! Console sign-ins kept in memory: a random 256-bit id per sign-in (the cookie), looked up
//! by its SHA-256 so the map's timing says nothing about a guessed id, each with the
//! principal it authenticated as, its CSRF token, and idle and absolute deadlines. A restart
//! signs everyone out, which is the safe direction.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use subtle::ConstantTimeEq;

use crate::auth::Principal;

/// Sign-ins kept at most; the least recently used one is dropped for a new one beyond it,
/// so a flood of sign-ins cannot grow memory without bound.
pub const MAX_SESSIONS: usize = 10_000;

/// A fresh 256-bit random value, base64url without padding (43 characters).
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether `given` equals `expected`, in time that depends only on their lengths.
pub fn tokens_match(expected: &str, given: &str) -> bool {
    expected.len() == given.len() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

fn digest(id: &str) -> [u8; 32] {
    crate::auth::sha256(id)
}

/// What a request learns about its sign-in.
#[derive(Clone, Debug)]
pub struct SignedIn {
    /// Who signed in.
    pub principal: Principal,
    /// The token every form of this sign-in carries.
    pub csrf: String,
    /// A one-shot message from the previous action (shown once).
    pub flash: Option<String>,
}

struct Entry {
    principal: Principal,
    csrf: String,
    created: Instant,
    last_seen: Instant,
    flash: Option<String>,
}

/// Idle and absolute lifetimes of a sign-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// Ends after this long without a request.
    pub idle: Duration,
    /// Ends this long after sign-in, however busy.
    pub absolute: Duration,
}

/// The sign-ins of this process.
pub struct Sessions {
    lifetimes: Lifetimes,
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

impl Sessions {
    /// An empty store.
    pub fn new(lifetimes: Lifetimes) -> Self {
        Sessions {
            lifetimes,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The lifetimes sign-ins get.
    pub fn lifetimes(&self) -> Lifetimes {
        self.lifetimes
    }

    fn live(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.last_seen) < self.lifetimes.idle
            && now.saturating_duration_since(e.created) < self.lifetimes.absolute
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        // A panic while holding the lock cannot leave an entry half-written (every change is
        // one insert or remove), so a poisoned map is still sound.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a sign-in; returns its id (the cookie value) and CSRF token.
    pub fn create(&self, principal: Principal, now: Instant) -> (String, String) {
        let id = random_token();
        let csrf = random_token();
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, e| self.live(e, now));
        }
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, e)| e.last_seen).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(
            digest(&id),
            Entry {
                principal,
                csrf: csrf.clone(),
                created: now,
                last_seen: now,
                flash: None,
            },
        );
        (id, csrf)
    }

    /// The live sign-in of this id (its idle deadline moves on), taking its flash message;
    /// an expired one is forgotten.
    pub fn get(&self, id: &str, now: Instant) -> Option<SignedIn> {
        let key = digest(id);
        let mut map = self.lock();
        let live = map.get(&key).map(|e| self.live(e, now))?;
        if !live {
            map.remove(&key);
            return None;
        }
        let e = map.get_mut(&key)?;
        e.last_seen = now;
        Some(SignedIn {
            principal: e.principal.clone(),
            csrf: e.csrf.clone(),
            flash: e.flash.take(),
        })
    }

    /// Leaves a message for the next page of this sign-in.
    pub fn flash(&self, id: &str, message: String) {
        if let Some(e) = self.lock().get_mut(&digest(id)) {
            e.flash = Some(message);
        }
    }

    /// Ends a sign-in.
    pub fn remove(&self, id: &str) {
        self.lock().remove(&digest(id));
    }

    /// Sign-ins held (expired ones included until they are next looked at).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The cookie that names a sign-in.
pub const COOKIE: &str = "lockstep_console";
/// The cookie that carries the sign-in form's CSRF token (before any sign-in exists).
pub const PRE_COOKIE: &str = "lockstep_console_pre";

/// A `Set-Cookie` value: scoped to the console, out of scripts' reach, never sent on
/// cross-site requests, `Secure` when the browser reached us over HTTPS.
pub fn set_cookie(name: &str, value: &str, max_age: Option<Duration>, secure: bool) -> String {
    let mut c = format!("{name}={value}; Path=/console; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={}", age.as_secs()));
    }
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// A `Set-Cookie` value that deletes the cookie.
pub fn clear_cookie(name: &str, secure: bool) -> String {
    set_cookie(name, "", Some(Duration::ZERO), secure)
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Sessions {
        Sessions::new(Lifetimes {
            idle: Duration::from_secs(60),
            absolute: Duration::from_secs(300),
        })
    }

    #[test]
    fn ids_and_tokens_are_256_bit_and_distinct() {
        let a = random_token();
        assert_eq!(a.len(), 43);
        assert_ne!(a, random_token());
    }

    #[test]
    fn csrf_comparison_needs_the_exact_token() {
        let t = random_token();
        assert!(tokens_match(&t, &t.clone()));
        assert!(!tokens_match(&t, &t[..42]));
        assert!(!tokens_match(&t, ""));
        let mut other = t.clone().into_bytes();
        other[0] = if other[0] == b'A' { b'B' } else { b'A' };
        assert!(!tokens_match(&t, &String::from_utf8(other).unwrap()));
    }

    #[test]
    fn a_sign_in_ends_when_idle_and_at_its_absolute_deadline() {
        let s = store();
        let t0 = Instant::now();
        let (id, csrf) = s.create(Principal::Admin, t0);
        let got = s.get(&id, t0 + Duration::from_secs(59)).unwrap();
        assert_eq!(got.csrf, csrf);
        assert!(s.get("not-an-id", t0).is_none());
        // Each request moves the idle deadline on...
        for minute in 1..5 {
            assert!(
                s.get(&id, t0 + Duration::from_secs(59 * minute + 50))
                    .is_some()
            );
        }
        // ...but not the absolute one.
        assert!(s.get(&id, t0 + Duration::from_secs(300)).is_none());
        assert!(s.is_empty(), "an expired sign-in is forgotten");
        let (id, _) = s.create(Principal::Admin, t0);
        assert!(s.get(&id, t0 + Duration::from_secs(61)).is_none(), "idle");
    }

    #[test]
    fn sign_out_and_flash() {
        let s = store();
        let now = Instant::now();
        let (id, _) = s.create(Principal::Admin, now);
        s.flash(&id, "done".into());
        assert_eq!(s.get(&id, now).unwrap().flash.as_deref(), Some("done"));
        assert_eq!(s.get(&id, now).unwrap().flash, None, "shown once");
        s.remove(&id);
        assert!(s.get(&id, now).is_none());
    }

    #[test]
    fn the_store_is_bounded() {
        let s = store();
        let now = Instant::now();
        for i in 0..MAX_SESSIONS + 5 {
            s.create(Principal::Admin, now + Duration::from_millis(i as u64));
        }
        assert_eq!(s.len(), MAX_SESSIONS);
    }

    #[test]
    fn cookies_are_scoped_and_flagged() {
        let c = set_cookie(COOKIE, "abc", None, false);
        assert_eq!(
            c,
            "lockstep_console=abc; Path=/console; HttpOnly; SameSite=Strict"
        );
        let c = set_cookie(COOKIE, "abc", Some(Duration::from_secs(60)), true);
        assert!(c.ends_with("; Max-Age=60; Secure"), "{c}");
        assert!(clear_cookie(COOKIE, false).contains("Max-Age=0"));
        let header = "a=1; lockstep_console=xyz; lockstep_console_pre=p";
        assert_eq!(cookie(header, COOKIE), Some("xyz"));
        assert_eq!(cookie(header, PRE_COOKIE), Some("p"));
        assert_eq!(cookie(header, "b"), None);
    }
}
