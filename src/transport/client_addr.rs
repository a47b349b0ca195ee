//! Who a request comes from: the socket's peer, or, when the peer is a trusted proxy, the
//! address that proxy reports in the one header it writes (`X-Forwarded-For` or
//! `Forwarded`, as configured; the other passes through from the client untouched and is
//! ignored). Never the header of a peer that is not trusted: anybody can send one. Login
//! limits, sign-up limits and connection limits all count by this address, on every
//! transport.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

use crate::config::ProxyHeader;

/// The client's address, as every handler finds it in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The proxies whose forwarding header is believed (`trusted_proxies`, `proxy_header`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
    header: ProxyHeader,
}

impl TrustedProxies {
    /// Addresses (`10.0.0.1`) or networks (`10.0.0.0/8`, `fd00::/8`).
    pub fn parse(entries: &[String], header: ProxyHeader) -> Result<Self, String> {
        let networks = entries
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("trusted_proxies: '{entry}' is not an address or a network"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies { networks, header })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.networks.iter().any(|net| net.contains(&ip))
    }

    /// The client behind `peer`: walking the forwarded hops from the nearest, the first
    /// address that is not a trusted proxy. A hop that is not an address (`unknown`, an
    /// obfuscated name) ends the walk at the proxy that reported it.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for hop in forwarded_hops(headers, self.header).iter().rev() {
            match parse_hop(hop) {
                Some(ip) if self.trusts(ip) => client = ip,
                Some(ip) => return ip,
                None => return client,
            }
        }
        client
    }
}

/// IPv4 clients of a dual-stack socket arrive as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The forwarded-for hops in `header`, farthest first; several header lines are one list,
/// in order. Split as bytes, so one hop that is not text spoils only itself.
fn forwarded_hops(headers: &HeaderMap, header: ProxyHeader) -> Vec<String> {
    let name = match header {
        ProxyHeader::XForwardedFor => "x-forwarded-for",
        ProxyHeader::Forwarded => "forwarded",
    };
    let elements = headers
        .get_all(name)
        .iter()
        .flat_map(|line| line.as_bytes().split(|b| *b == b','))
        .map(|hop| String::from_utf8_lossy(hop).trim().to_owned())
        .filter(|hop| !hop.is_empty());
    match header {
        ProxyHeader::XForwardedFor => elements.collect(),
        // RFC 7239: `for=192.0.2.60;proto=http;by=…`; an element without `for` is no hop.
        ProxyHeader::Forwarded => elements
            .map(|element| {
                element
                    .split(';')
                    .find_map(|pair| {
                        let (key, value) = pair.trim().split_once('=')?;
                        key.trim()
                            .eq_ignore_ascii_case("for")
                            .then(|| value.trim().trim_matches('"').to_owned())
                    })
                    .unwrap_or_default()
            })
            .collect(),
    }
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(canonical(addr.ip()));
    }
    let inner = hop.strip_prefix('[')?.split(']').next()?;
    inner.parse::<IpAddr>().ok().map(canonical)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).expect("header"));
        }
        h
    }

    #[test]
    fn headers_of_an_untrusted_peer_are_ignored() {
        let trusted = TrustedProxies::parse(&["10.0.0.0/8".into()], ProxyHeader::XForwardedFor).expect("parse");
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(trusted.client(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        assert_eq!(TrustedProxies::default().client(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn a_trusted_proxy_reports_the_client_and_spoofed_hops_further_left_are_ignored() {
        let trusted = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.168.1.1".into()], ProxyHeader::XForwardedFor)
            .expect("parse");
        // The client claimed 6.6.6.6 itself; the proxy appended the real address.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.1.1")]);
        assert_eq!(trusted.client(ip("192.168.1.1"), &h), ip("198.51.100.7"));
        let h = headers(&[("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "198.51.100.7:5555")]);
        assert_eq!(trusted.client(ip("10.0.0.2"), &h), ip("198.51.100.7"));
        // No header: the proxy itself.
        assert_eq!(trusted.client(ip("10.0.0.2"), &HeaderMap::new()), ip("10.0.0.2"));
        // Garbage: stop at the proxy that reported it.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, unknown")]);
        assert_eq!(trusted.client(ip("10.0.0.2"), &h), ip("10.0.0.2"));
        // A client's bad byte spoils only its own hop, not the address the proxy appended.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff, 198.51.100.7").expect("header"),
        );
        assert_eq!(trusted.client(ip("10.0.0.2"), &h), ip("198.51.100.7"));
        // The header the proxies do not write is the client's own: ignored.
        let h = headers(&[("forwarded", "for=6.6.6.6"), ("x-forwarded-for", "198.51.100.8")]);
        assert_eq!(trusted.client(ip("10.0.0.2"), &h), ip("198.51.100.8"));
    }

    #[test]
    fn forwarded_when_configured_and_its_forms_parse() {
        let trusted =
            TrustedProxies::parse(&["::1".into(), "127.0.0.1".into()], ProxyHeader::Forwarded).expect("parse");
        let h = headers(&[
            (
                "forwarded",
                r#"for=192.0.2.60;proto=http, for="[2001:db8:cafe::17]:4711""#,
            ),
            ("x-forwarded-for", "9.9.9.9"),
        ]);
        assert_eq!(trusted.client(ip("127.0.0.1"), &h), ip("2001:db8:cafe::17"));
        assert_eq!(trusted.client(ip("::ffff:127.0.0.1"), &h), ip("2001:db8:cafe::17"));
        assert!(TrustedProxies::parse(&["not an address".into()], ProxyHeader::Forwarded).is_err());
    }
}
