//! The client's IP address: the socket peer, unless that peer is a configured trusted proxy,
//! in which case the right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
//! Nobody else can choose the address their requests are counted under.

use std::net::IpAddr;

use salvo::Request;

pub fn client_ip(req: &Request, trusted_proxies: &[IpAddr]) -> Option<IpAddr> {
    let peer = req.remote_addr().ip()?;
    if !trusted_proxies.contains(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|part| part.trim().parse().ok())
        .collect();
    Some(from_chain(peer, &forwarded, trusted_proxies))
}

/// Walks the chain from the nearest hop outwards and stops at the first untrusted address.
fn from_chain(peer: IpAddr, forwarded: &[IpAddr], trusted_proxies: &[IpAddr]) -> IpAddr {
    forwarded
        .iter()
        .rev()
        .find(|ip| !trusted_proxies.contains(ip))
        .or(forwarded.first())
        .copied()
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn chain() {
        let trusted = [ip("127.0.0.1"), ip("10.0.0.1")];
        let peer = ip("127.0.0.1");
        for (chain, expected) in [
            (vec![], "127.0.0.1"),
            (vec!["1.2.3.4"], "1.2.3.4"),
            (vec!["6.6.6.6", "1.2.3.4"], "1.2.3.4"),
            (vec!["1.2.3.4", "10.0.0.1"], "1.2.3.4"),
            (vec!["10.0.0.1"], "10.0.0.1"),
        ] {
            let chain: Vec<IpAddr> = chain.into_iter().map(ip).collect();
            assert_eq!(from_chain(peer, &chain, &trusted), ip(expected), "{chain:?}");
        }
    }
}
