//! Log names: they are directory names on every node, and travel in every request.

/// Longest log name, in bytes.
pub const LOG_NAME_BYTES_MAX: usize = 200;

/// Log names are directory names: 1 to [`LOG_NAME_BYTES_MAX`] bytes of `[A-Za-z0-9._-]`, not
/// starting with a dot. `Err` says what is wrong with `name`.
pub fn check_log_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty")
    } else if name.len() > LOG_NAME_BYTES_MAX {
        Err("longer than LOG_NAME_BYTES_MAX")
    } else if name.starts_with('.') {
        Err("starts with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Err("characters outside [A-Za-z0-9._-]")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules_and_the_limit() {
        assert_eq!(check_log_name("orders-2.eu_1"), Ok(()));
        assert_eq!(check_log_name(""), Err("empty"));
        assert_eq!(check_log_name(".hidden"), Err("starts with a dot"));
        assert_eq!(
            check_log_name("a/b"),
            Err("characters outside [A-Za-z0-9._-]")
        );
        assert_eq!(check_log_name(&"x".repeat(LOG_NAME_BYTES_MAX)), Ok(()));
        assert_eq!(
            check_log_name(&"x".repeat(LOG_NAME_BYTES_MAX + 1)),
            Err("longer than LOG_NAME_BYTES_MAX")
        );
    }
}
