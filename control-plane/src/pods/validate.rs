//! Checks on what a user sends to create a pod: the name, environment, command and port.

use std::collections::BTreeMap;

/// Longest environment value, and most variables.
const MAX_ENV_VALUE: usize = 32 * 1024;
const MAX_ENV_VARS: usize = 128;
const MAX_COMMAND_ARGS: usize = 256;

/// A pod name: a DNS label of 3 to 40 of `a-z`, `0-9`, `-`, starting with a letter, not ending
/// with `-`.
pub fn name(raw: &str) -> Result<String, String> {
    let ok = (3..=40).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && raw.as_bytes()[0].is_ascii_lowercase()
        && !raw.ends_with('-')
        && !raw.contains("--");
    if ok {
        Ok(raw.to_string())
    } else {
        Err(format!(
            "name {raw:?}: use 3 to 40 lowercase letters, digits and single hyphens, starting with a letter"
        ))
    }
}

/// Environment variables: POSIX-ish names, bounded values.
pub fn env(vars: &BTreeMap<String, String>) -> Result<(), String> {
    if vars.len() > MAX_ENV_VARS {
        return Err(format!("env: at most {MAX_ENV_VARS} variables"));
    }
    for (key, value) in vars {
        let good_key = !key.is_empty()
            && key.len() <= 128
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !key.as_bytes()[0].is_ascii_digit();
        if !good_key {
            return Err(format!(
                "env: {key:?} is not a valid variable name (letters, digits, _)"
            ));
        }
        if value.len() > MAX_ENV_VALUE || value.contains('\0') {
            return Err(format!("env: the value of {key} is too long or contains NUL"));
        }
    }
    Ok(())
}

/// A command: argv, non-empty, bounded, no NUL.
pub fn command(args: &[String]) -> Result<(), String> {
    if args.is_empty() || args[0].is_empty() {
        return Err("command: give the program and its arguments, e.g. [\"node\", \"server.js\"]".into());
    }
    if args.len() > MAX_COMMAND_ARGS || args.iter().any(|a| a.len() > 4096 || a.contains('\0')) {
        return Err("command: too many or too long arguments".into());
    }
    Ok(())
}

/// A node's peer address (where other nodes pull volumes): `host:port`, at most 255
/// characters, the host letters, digits, `.`, `-`, or an IPv6 address in brackets.
pub fn peer_addr(raw: &str) -> Result<String, String> {
    let problem = || format!("peer_addr must be host:port, such as 10.0.0.5:9102 (got {raw:?})");
    let (host, port) = raw.rsplit_once(':').ok_or_else(problem)?;
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    if raw.len() > 255 || !host_ok || !port_ok || host == "0.0.0.0" || host == "[::]" {
        return Err(problem());
    }
    Ok(raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_are_host_and_port() {
        for good in ["10.0.0.5:9102", "node-1.internal:9102", "[::1]:9102"] {
            assert_eq!(peer_addr(good).as_deref(), Ok(good), "{good}");
        }
        for bad in [
            "10.0.0.5",
            "10.0.0.5:0",
            ":9102",
            "0.0.0.0:9102",
            "a b:1",
            "h:1/x",
            "[zz]:1",
        ] {
            assert!(peer_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_dns_labels_of_3_to_40() {
        for good in ["web", "my-app-2", &"a".repeat(40)] {
            assert!(name(good).is_ok(), "{good}");
        }
        for bad in [
            "ab",
            "Web",
            "-web",
            "web-",
            "we--b",
            "1web",
            "we_b",
            "web.x",
            &"a".repeat(41),
            "wéb",
            "",
        ] {
            assert!(name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_and_command_are_checked() {
        assert!(env(&BTreeMap::from([("PORT".into(), "1".into())])).is_ok());
        assert!(env(&BTreeMap::from([("1X".into(), "1".into())])).is_err());
        assert!(env(&BTreeMap::from([("A=B".into(), "1".into())])).is_err());
        assert!(command(&[]).is_err());
        assert!(command(&["node".into()]).is_ok());
    }
}
