//! Pagination cursors, shared by every listing: opaque to clients (a versioned, hex-encoded
//! position), so the encoding can change without breaking them.

use super::error::ApiError;

/// The cursor for "rows after `after`".
pub(super) fn encode(after: i64) -> String {
    hex::encode(format!("v1:{after}"))
}

/// The position a cursor stands for; anything this server did not issue is a 400.
pub(super) fn decode(cursor: &str) -> Result<i64, ApiError> {
    hex::decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("v1:").and_then(|n| n.parse::<i64>().ok()))
        .filter(|n| *n >= 0)
        .ok_or_else(|| ApiError::Validation("cursor is not one this server issued".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_forgeries() {
        assert_eq!(decode(&encode(42)).unwrap(), 42);
        assert!(decode("zz").is_err());
        assert!(decode("42").is_err());
        assert!(decode(&hex::encode("v1:-5")).is_err());
        assert!(decode(&hex::encode("v2:5")).is_err());
    }
}
