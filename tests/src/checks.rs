//! Assertions about the shapes the API contract (docs/api.md) fixes: UUID ids, RFC 3339 UTC
//! timestamps, and `Set-Cookie` attributes.

use serde_json::Value;

/// Asserts that `value` is a UUID string and returns it.
pub fn assert_uuid(value: &Value, what: &str) -> String {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what} should be a UUID string, got {value}"));
    assert!(
        uuid::Uuid::parse_str(text).is_ok(),
        "{what} should be a UUID, got {text:?}"
    );
    text.to_string()
}

/// Whether `text` is an RFC 3339 date-time in UTC (`Z` or `+00:00`).
pub fn is_rfc3339_utc(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits =
        |range: std::ops::Range<usize>| bytes.get(range).is_some_and(|part| part.iter().all(u8::is_ascii_digit));
    let shape = bytes.len() >= 20
        && digits(0..4)
        && bytes[4] == b'-'
        && digits(5..7)
        && bytes[7] == b'-'
        && digits(8..10)
        && matches!(bytes[10], b'T' | b't')
        && digits(11..13)
        && bytes[13] == b':'
        && digits(14..16)
        && bytes[16] == b':'
        && digits(17..19);
    if !shape {
        return false;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n_digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n_digits == 0 {
            return false;
        }
        rest = &fraction[n_digits..];
    }
    matches!(rest, "Z" | "z" | "+00:00")
}

/// Asserts that `value` is an RFC 3339 UTC timestamp string and returns it.
pub fn assert_timestamp(value: &Value, what: &str) -> String {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what} should be an RFC 3339 string, got {value}"));
    assert!(
        is_rfc3339_utc(text),
        "{what} should be an RFC 3339 UTC timestamp, got {text:?}"
    );
    text.to_string()
}

/// A parsed `Set-Cookie` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCookie {
    pub name: String,
    pub value: String,
    /// Attributes as (lowercased name, value), e.g. `("samesite", "Lax")`, `("httponly", "")`.
    pub attributes: Vec<(String, String)>,
}

impl SetCookie {
    /// Parses `name=value; Attr; Attr=Value`.
    pub fn parse(header: &str) -> SetCookie {
        let mut parts = header.split(';');
        let (name, value) = parts
            .next()
            .and_then(|pair| pair.split_once('='))
            .unwrap_or_else(|| panic!("malformed Set-Cookie {header:?}"));
        let attributes = parts
            .map(|attribute| {
                let attribute = attribute.trim();
                let (key, value) = attribute.split_once('=').unwrap_or((attribute, ""));
                (key.trim().to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        SetCookie {
            name: name.trim().to_string(),
            value: value.trim().to_string(),
            attributes,
        }
    }

    /// Whether the attribute `name` (case-insensitive) is present.
    pub fn has(&self, name: &str) -> bool {
        self.attributes.iter().any(|(key, _)| key.eq_ignore_ascii_case(name))
    }

    /// The value of attribute `name` (case-insensitive), if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Whether this header tells the browser to drop the cookie: `Max-Age` of zero or less, or
    /// an `Expires` date (`Wdy, DD Mon YYYY HH:MM:SS GMT`) before today.
    pub fn removes_cookie(&self) -> bool {
        let max_age_zero = self
            .get("max-age")
            .and_then(|age| age.parse::<i64>().ok())
            .is_some_and(|age| age <= 0);
        let expired = self
            .get("expires")
            .and_then(http_date_days)
            .is_some_and(|day| day < days_since_epoch_now());
        max_age_zero || expired
    }
}

/// Days since 1970-01-01 of an HTTP date such as `Thu, 01 Jan 1970 00:00:00 GMT`.
fn http_date_days(date: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let parts: Vec<&str> = date.split([' ', '-', ',']).filter(|p| !p.is_empty()).collect();
    let day: i64 = parts.get(1)?.parse().ok()?;
    let month_name = parts.get(2)?.to_ascii_lowercase();
    let month = MONTHS.iter().position(|m| *m == month_name)? as i64 + 1;
    let year: i64 = parts.get(3)?.parse().ok()?;
    Some(days_from_civil(year, month, day))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn days_since_epoch_now() -> i64 {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    i64::try_from(seconds / 86_400).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        for good in [
            "2026-11-27T12:00:00Z",
            "2026-11-27T12:00:00.123456Z",
            "2026-11-27T12:00:00+00:00",
        ] {
            assert!(is_rfc3339_utc(good), "{good}");
        }
        for bad in [
            "2026-11-27 12:00:00",
            "2026-11-27T12:00:00+01:00",
            "2026-11-27T12:00:00.Z",
            "1700000000",
            "",
        ] {
            assert!(!is_rfc3339_utc(bad), "{bad}");
        }
    }

    #[test]
    fn set_cookie_parsing() {
        let cookie = SetCookie::parse("instapod_session=ipd_x; HttpOnly; SameSite=Lax; Path=/; Max-Age=0");
        assert_eq!(cookie.name, "instapod_session");
        assert_eq!(cookie.value, "ipd_x");
        assert!(cookie.has("httponly"));
        assert_eq!(cookie.get("samesite"), Some("Lax"));
        assert!(!cookie.has("domain"));
        assert!(cookie.removes_cookie());
        let expired = SetCookie::parse("instapod_session=; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT");
        assert!(expired.removes_cookie());
        let live = SetCookie::parse("instapod_session=a; Expires=Fri, 27 Dec 2999 00:00:00 GMT");
        assert!(!live.removes_cookie());
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(http_date_days("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
    }
}
