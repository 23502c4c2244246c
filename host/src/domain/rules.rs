//! Input limits (docs/api.md, "Limits"), as pure functions: realm names, ids and attributes.
//! Every client-supplied value passes through here before it reaches the store.

use super::Attributes;

/// Longest external id, session id, user id or system label accepted.
pub const MAX_ID_LEN: usize = 255;
/// Most attribute entries on one session.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute key.
pub const MAX_ATTRIBUTE_KEY_LEN: usize = 128;
/// Most bytes of keys plus values on one session.
pub const MAX_ATTRIBUTES_BYTES: usize = 8 * 1024;
/// Longest realm name.
pub const MAX_REALM_LEN: usize = 64;

/// A value broke one of the limits; the message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

/// Realm names are 1–64 characters from `[A-Za-z0-9._-]`.
pub fn realm(name: &str) -> Result<(), ValidationError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > MAX_REALM_LEN || !ok_chars {
        return Err(ValidationError(format!(
            "realm must be 1-{MAX_REALM_LEN} characters from [A-Za-z0-9._-], got {}",
            quoted(name)
        )));
    }
    Ok(())
}

/// Ids are 1–255 characters without control characters.
pub fn id(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError(format!("{field} must not be empty")));
    }
    let chars = value.chars().count();
    if chars > MAX_ID_LEN {
        return Err(ValidationError(format!(
            "{field} is {chars} characters long; the limit is {MAX_ID_LEN}"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

/// Like [`id`] for an optional field.
pub fn optional_id(field: &str, value: Option<&str>) -> Result<(), ValidationError> {
    value.map_or(Ok(()), |v| id(field, v))
}

/// At most 64 entries, non-empty keys of at most 128 characters, 8 KiB of keys and values.
pub fn attributes(attrs: &Attributes) -> Result<(), ValidationError> {
    if attrs.len() > MAX_ATTRIBUTES {
        return Err(ValidationError(format!(
            "attributes has {} entries; the limit is {MAX_ATTRIBUTES}",
            attrs.len()
        )));
    }
    let mut total = 0usize;
    for (key, value) in attrs {
        if key.is_empty() {
            return Err(ValidationError("attribute keys must not be empty".into()));
        }
        if key.chars().count() > MAX_ATTRIBUTE_KEY_LEN {
            return Err(ValidationError(format!(
                "attribute key {} is longer than {MAX_ATTRIBUTE_KEY_LEN} characters",
                quoted(key)
            )));
        }
        if key.chars().any(char::is_control) {
            return Err(ValidationError(format!(
                "attribute key {} contains control characters",
                quoted(key)
            )));
        }
        total += key.len() + value.len();
    }
    if total > MAX_ATTRIBUTES_BYTES {
        return Err(ValidationError(format!(
            "attributes hold {total} bytes of keys and values; the limit is {MAX_ATTRIBUTES_BYTES}"
        )));
    }
    Ok(())
}

/// Quotes echoed input for an error message, escaped and bounded after escaping: one
/// character can escape to eleven (`\u{100000}`), so bounding before would not bound.
fn quoted(s: &str) -> String {
    const SHOWN: usize = 60;
    let mut escaped: String = s.escape_debug().take(SHOWN + 1).collect();
    if escaped.chars().count() > SHOWN {
        escaped = escaped.chars().take(SHOWN).collect();
        escaped.push('…');
    }
    format!("\"{escaped}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realm_names_follow_the_documented_alphabet() {
        assert!(realm("acme").is_ok());
        assert!(realm("a.b_c-1").is_ok());
        assert!(realm(&"x".repeat(64)).is_ok());
        assert!(realm("").is_err());
        assert!(realm(&"x".repeat(65)).is_err());
        assert!(realm("a b").is_err());
        assert!(realm("ä").is_err());
    }

    #[test]
    fn echoed_input_is_bounded_after_escaping() {
        // Escaping first made a 40-character echo of `\u{100000}` 440 characters long.
        let wide = "\u{100000}\u{10}".repeat(40);
        for message in [
            realm(&wide).unwrap_err().0,
            attributes(&Attributes::from([(wide.clone(), String::new())]))
                .unwrap_err()
                .0,
        ] {
            assert!(message.chars().count() < 200, "{message}");
            assert!(message.contains("\\u{100000}\\u{10}"), "{message}");
            assert!(message.contains('…'), "{message}");
        }
        assert!(realm("a b").unwrap_err().0.ends_with("got \"a b\""));
    }

    #[test]
    fn ids_must_be_non_empty_bounded_and_printable() {
        assert!(id("externalId", "portal-session-001").is_ok());
        assert!(id("externalId", &"é".repeat(255)).is_ok());
        assert!(id("externalId", "").is_err());
        assert!(id("externalId", &"x".repeat(256)).is_err());
        assert!(id("externalId", "a\nb").is_err());
    }

    #[test]
    fn attributes_are_bounded_in_count_key_length_and_bytes() {
        let mut a = Attributes::new();
        for i in 0..64 {
            a.insert(format!("k{i}"), "v".into());
        }
        assert!(attributes(&a).is_ok());
        a.insert("k64".into(), "v".into());
        assert!(attributes(&a).is_err());

        let long_key: Attributes = [("k".repeat(129), String::new())].into();
        assert!(attributes(&long_key).is_err());
        let empty_key: Attributes = [(String::new(), "v".into())].into();
        assert!(attributes(&empty_key).is_err());

        let big: Attributes = [("k".into(), "v".repeat(8 * 1024))].into();
        assert!(attributes(&big).is_err());
        let fits: Attributes = [("k".into(), "v".repeat(8 * 1024 - 1))].into();
        assert!(attributes(&fits).is_ok());
    }

    mod properties {
        //! Property tests: each rule against an independent statement of it (the oracle), on
        //! arbitrary text — any Unicode, control characters, empty and oversized values.
        use super::super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: 256,
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        /// Text with a good share of the interesting characters: ASCII, control characters
        /// (C0, DEL, C1), multi-byte letters and astral-plane characters.
        fn text(max: usize) -> impl Strategy<Value = String> {
            let c = prop_oneof![
                4 => proptest::char::range('a', 'z'),
                1 => proptest::char::range('\u{0}', '\u{1f}'),
                1 => proptest::char::range('\u{7f}', '\u{a0}'),
                1 => Just('é'),
                1 => Just('𝄞'),
                1 => any::<char>(),
                1 => prop_oneof![Just('.'), Just('_'), Just('-'), Just(' '), Just('/')],
            ];
            proptest::collection::vec(c, 0..=max).prop_map(|v| v.into_iter().collect())
        }

        fn id_oracle(v: &str) -> bool {
            let n = v.chars().count();
            (1..=MAX_ID_LEN).contains(&n)
                && !v.chars().any(|c| {
                    ('\u{0}'..='\u{1f}').contains(&c) || ('\u{7f}'..='\u{9f}').contains(&c)
                })
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn ids_are_accepted_exactly_when_1_to_255_characters_without_controls(v in text(300)) {
                let got = id("externalId", &v);
                prop_assert_eq!(got.is_ok(), id_oracle(&v), "{:?} -> {:?}", v, got);
                if let Err(ValidationError(message)) = got {
                    prop_assert!(message.starts_with("externalId "), "{}", message);
                }
                prop_assert_eq!(optional_id("userId", Some(&v)).is_ok(), id_oracle(&v));
            }

            #[test]
            fn ids_of_any_length_are_judged_by_characters_not_bytes(c in any::<char>(), n in 250usize..260) {
                let v: String = std::iter::repeat_n(c, n).collect();
                prop_assert_eq!(id("id", &v).is_ok(), n <= MAX_ID_LEN && !c.is_control());
            }

            #[test]
            fn realms_are_accepted_exactly_when_1_to_64_of_the_alphabet(v in text(80)) {
                let oracle = (1..=MAX_REALM_LEN).contains(&v.len())
                    && v.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c));
                let got = realm(&v);
                prop_assert_eq!(got.is_ok(), oracle, "{:?}", v);
                if let Err(ValidationError(message)) = got {
                    // The echo of the input is bounded, whatever its size.
                    prop_assert!(message.chars().count() < 200, "{}", message);
                }
            }

        }

        proptest! {
            // Maps of up to 70 entries are slow to generate: fewer cases, still on both sides
            // of each limit (count, key length, total bytes).
            #![proptest_config(ProptestConfig { cases: 48, ..config() })]

            #[test]
            fn attributes_are_accepted_exactly_within_the_limits(
                entries in proptest::collection::vec((text(140), text(260)), 0..70),
            ) {
                let attrs: Attributes = entries.into_iter().collect();
                let oracle = attrs.len() <= MAX_ATTRIBUTES
                    && attrs.keys().all(|k| {
                        !k.is_empty() && k.chars().count() <= MAX_ATTRIBUTE_KEY_LEN && !k.chars().any(char::is_control)
                    })
                    && attrs.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= MAX_ATTRIBUTES_BYTES;
                prop_assert_eq!(attributes(&attrs).is_ok(), oracle);
            }
        }
    }
}
