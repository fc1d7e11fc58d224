//! Input rules for accounts and teams, each returning a message that states the rule.

/// Normalises an email (trimmed, lowercased) and checks its shape.
pub fn email(raw: &str) -> Result<String, String> {
    let email = raw.trim().to_lowercase();
    let rule = "email must look like name@example.com (at most 254 characters)";
    if email.is_empty() || email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(rule.to_string());
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err(rule.to_string());
    };
    if local.is_empty()
        || local.len() > 64
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || domain.contains("..")
    {
        return Err(rule.to_string());
    }
    Ok(email)
}

pub const PASSWORD_MIN_CHARS: usize = 8;
pub const PASSWORD_MAX_CHARS: usize = 1024;

/// Passwords are 8 to 1024 characters (Unicode scalar values); nothing else is imposed and
/// nothing is ever truncated.
pub fn password(password: &str) -> Result<(), String> {
    let n_chars = password.chars().count();
    if !(PASSWORD_MIN_CHARS..=PASSWORD_MAX_CHARS).contains(&n_chars) {
        return Err(format!(
            "password must be {PASSWORD_MIN_CHARS} to {PASSWORD_MAX_CHARS} characters long"
        ));
    }
    Ok(())
}

/// Display names: 1 to 100 characters after trimming, no control characters.
pub fn display_name(field: &str, raw: &str) -> Result<String, String> {
    let name = raw.trim();
    let n_chars = name.chars().count();
    if n_chars == 0 || n_chars > 100 || name.chars().any(char::is_control) {
        return Err(format!(
            "{field} must be 1 to 100 characters without control characters"
        ));
    }
    Ok(name.to_string())
}

/// Team slugs are DNS labels: 3 to 30 of `a-z`, `0-9` and `-`, not starting or ending with `-`.
pub fn slug(raw: &str) -> Result<String, String> {
    let ok = (3..=30).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !raw.starts_with('-')
        && !raw.ends_with('-');
    if ok {
        Ok(raw.to_string())
    } else {
        Err("slug must be 3 to 30 characters of a-z, 0-9 and '-', not starting or ending with '-'".to_string())
    }
}

/// A slug derived from a display name: lowercased, runs of other characters become one `-`,
/// padded or cut to fit the slug rule. May still collide; callers add a suffix.
pub fn slug_from(name: &str) -> String {
    let mut slug = String::new();
    for c in name.to_lowercase().chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            slug.push(c);
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    slug.truncate(24);
    while slug.ends_with('-') {
        slug.pop();
    }
    if slug.len() < 3 {
        slug = format!("team-{slug}").trim_end_matches('-').to_string();
    }
    slug
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        for (raw, expected) in [
            (" Foo@Example.COM ", Some("foo@example.com")),
            ("a@b.co", Some("a@b.co")),
            ("no-at.example.com", None),
            ("a@b", None),
            ("a b@c.com", None),
            ("a@@c.com", None),
            ("@c.com", None),
            ("a@c..com", None),
            ("", None),
        ] {
            assert_eq!(email(raw).ok().as_deref(), expected, "{raw:?}");
        }
    }

    #[test]
    fn passwords() {
        assert!(password("1234567").is_err());
        assert!(password("12345678").is_ok());
        assert!(password(&"é".repeat(64)).is_ok());
        assert!(password(&"x".repeat(1024)).is_ok());
        assert!(password(&"x".repeat(1025)).is_err());
    }

    #[test]
    fn slugs() {
        for (raw, ok) in [
            ("abc", true),
            ("a-b-c", true),
            ("ab", false),
            ("-ab", false),
            ("ab-", false),
            ("Abc", false),
            ("a_b", false),
            (&"a".repeat(31), false),
        ] {
            assert_eq!(slug(raw).is_ok(), ok, "{raw:?}");
        }
        assert_eq!(slug_from("My Team!"), "my-team");
        assert_eq!(slug_from("X"), "team-x");
        assert_eq!(slug_from("!!"), "team");
        assert!(slug(&slug_from(&"long name ".repeat(10))).is_ok());
    }
}
