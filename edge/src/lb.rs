//! `reverse_proxy`'s load-balancing policies (`lb_policy`), with Caddy 2.6's choices:
//! `random` (Caddy's default), `random_choose N`, `least_conn`, `round_robin`, `first`,
//! `ip_hash`, `client_ip_hash`, `uri_hash`, `header NAME` and `cookie [NAME [SECRET]]`.
//!
//! The hash policies are Caddy's rendezvous hashing: every available upstream scores
//! FNV-1a-32(key + its dial address) and the highest score wins (the first on a tie), so the
//! same key reaches the same upstream on Caddy and the edge, and a key moves only when its
//! upstream goes away. `cookie` remembers the choice as HMAC-SHA256(secret, dial address) in
//! hex, as Caddy does, so the cookies are interchangeable.
//!
//! Invariants: a policy only ever picks an available upstream (`None` when there is none);
//! the cookie secret is never printed (Debug shows its length only) and a cookie is compared
//! with every upstream's value in constant time.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use hyper::http::{HeaderMap, HeaderName, HeaderValue, header};
use rand::Rng;
use subtle::ConstantTimeEq;

/// A compiled `lb_policy`.
pub(crate) enum Policy {
    /// A random available upstream.
    Random,
    /// The least busy of N random ones.
    RandomChoose(usize),
    /// The one with the fewest requests in flight (random among equals).
    LeastConn,
    /// Each in turn.
    RoundRobin(AtomicU32),
    /// The first available.
    First,
    /// Hash of the connecting peer's address.
    IpHash,
    /// Hash of the client's address (the peer's, unless a trusted proxy said otherwise).
    ClientIpHash,
    /// Hash of the request target.
    UriHash,
    /// Hash of a header's value (random when the request has none).
    Header(HeaderName),
    /// A cookie naming the upstream, set on the first response.
    Cookie {
        /// The cookie's name.
        name: String,
        /// The HMAC key.
        secret: Vec<u8>,
    },
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::Cookie { name, secret } => write!(
                f,
                "Cookie {{ name: {name:?}, secret: <{} bytes> }}",
                secret.len()
            ),
            Policy::Header(name) => write!(f, "Header({name})"),
            Policy::RandomChoose(n) => write!(f, "RandomChoose({n})"),
            other => f.write_str(other.name()),
        }
    }
}

impl Policy {
    /// Parses `lb_policy`'s words ("cookie lb SECRET", "header X-User", "first").
    pub(crate) fn parse(text: &str) -> Result<Policy, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let no_args = |p: Policy| match words.len() {
            1 => Ok(p),
            _ => Err(format!("lb_policy {} takes no argument", words[0])),
        };
        match words.as_slice() {
            [] => Err("lb_policy needs a policy name".into()),
            ["random", ..] => no_args(Policy::Random),
            ["least_conn", ..] => no_args(Policy::LeastConn),
            ["round_robin", ..] => no_args(Policy::RoundRobin(AtomicU32::new(0))),
            ["first", ..] => no_args(Policy::First),
            ["ip_hash", ..] => no_args(Policy::IpHash),
            ["client_ip_hash", ..] => no_args(Policy::ClientIpHash),
            ["uri_hash", ..] => no_args(Policy::UriHash),
            ["random_choose"] => Ok(Policy::RandomChoose(2)),
            ["random_choose", n] => match n.parse::<usize>() {
                Ok(n) if n >= 2 => Ok(Policy::RandomChoose(n)),
                _ => Err(format!(
                    "lb_policy random_choose: {n:?} is not a number of at least 2"
                )),
            },
            ["header", name] => HeaderName::from_bytes(name.as_bytes())
                .map(Policy::Header)
                .map_err(|_| format!("lb_policy header: {name:?} is not a header name")),
            ["header", ..] => Err("lb_policy header takes one header name".into()),
            ["cookie"] => Ok(Policy::Cookie {
                name: "lb".into(),
                secret: Vec::new(),
            }),
            ["cookie", name] | ["cookie", name, _] => {
                if name.is_empty() || !name.bytes().all(is_cookie_name_byte) {
                    return Err(format!("lb_policy cookie: {name:?} is not a cookie name"));
                }
                Ok(Policy::Cookie {
                    name: (*name).to_owned(),
                    secret: words
                        .get(2)
                        .map(|s| s.as_bytes().to_vec())
                        .unwrap_or_default(),
                })
            }
            ["cookie", ..] => Err("lb_policy cookie takes at most a name and a secret".into()),
            [other, ..] => Err(format!(
                "lb_policy {other:?} is not supported (random, random_choose, least_conn, round_robin, first, ip_hash, client_ip_hash, uri_hash, header, cookie)"
            )),
        }
    }

    /// Whether choosing reads the request's headers.
    pub(crate) fn reads_headers(&self) -> bool {
        matches!(self, Policy::Header(_) | Policy::Cookie { .. })
    }

    fn name(&self) -> &'static str {
        match self {
            Policy::Random => "random",
            Policy::RandomChoose(_) => "random_choose",
            Policy::LeastConn => "least_conn",
            Policy::RoundRobin(_) => "round_robin",
            Policy::First => "first",
            Policy::IpHash => "ip_hash",
            Policy::ClientIpHash => "client_ip_hash",
            Policy::UriHash => "uri_hash",
            Policy::Header(_) => "header",
            Policy::Cookie { .. } => "cookie",
        }
    }
}

fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)
}

/// What the policies read of a request.
#[derive(Debug)]
pub(crate) struct Pick<'a> {
    /// The connecting peer.
    pub(crate) peer: IpAddr,
    /// The client, as far as trusted proxies tell.
    pub(crate) client: IpAddr,
    /// The request target (path and query) as it stands.
    pub(crate) target: &'a str,
    /// The Host, as sent.
    pub(crate) host: &'a str,
    /// The request headers.
    pub(crate) headers: &'a HeaderMap,
}

/// One upstream as a policy sees it.
pub(crate) trait Candidate {
    /// Caddy's dial address.
    fn dial(&self) -> &str;
    /// Whether it may be chosen.
    fn available(&self) -> bool;
    /// Requests in flight.
    fn in_flight(&self) -> usize;
}

/// The choice: an index, and a `Set-Cookie` value when the cookie policy made a new one.
pub(crate) type Choice = Option<(usize, Option<HeaderValue>)>;

impl Policy {
    /// Chooses among `pool`.
    pub(crate) fn select<C: Candidate>(&self, pool: &[C], req: &Pick<'_>) -> Choice {
        let plain = |i: Option<usize>| i.map(|i| (i, None));
        match self {
            Policy::Random => plain(random(pool)),
            Policy::RandomChoose(k) => plain(random_choose(pool, *k)),
            Policy::LeastConn => plain(least_conn(pool)),
            Policy::RoundRobin(robin) => {
                let n = pool.len() as u32;
                if n == 0 {
                    return None;
                }
                // Caddy adds before it reads: the first request goes to the second upstream.
                for _ in 0..n {
                    let turn = robin.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
                    let i = (turn % n) as usize;
                    if pool[i].available() {
                        return Some((i, None));
                    }
                }
                None
            }
            Policy::First => plain(pool.iter().position(Candidate::available)),
            Policy::IpHash => plain(by_hash(pool, &req.peer.to_string())),
            Policy::ClientIpHash => plain(by_hash(pool, &req.client.to_string())),
            Policy::UriHash => plain(by_hash(pool, req.target)),
            Policy::Header(name) => {
                if name == header::HOST && !req.host.is_empty() {
                    return plain(by_hash(pool, req.host));
                }
                // Go's Header.Get: the first value; a missing or empty one picks at random.
                match req.headers.get(name).map(|v| v.as_bytes()) {
                    Some(v) if !v.is_empty() => plain(by_hash(pool, &String::from_utf8_lossy(v))),
                    _ => plain(random(pool)),
                }
            }
            Policy::Cookie { name, secret } => {
                if let Some(value) = cookie(req.headers, name) {
                    for (i, up) in pool.iter().enumerate() {
                        if up.available()
                            && bool::from(hmac_hex(secret, up.dial()).as_bytes().ct_eq(value))
                        {
                            return Some((i, None));
                        }
                    }
                }
                let i = random(pool)?;
                let set = format!("{name}={}; Path=/", hmac_hex(secret, pool[i].dial()));
                Some((i, HeaderValue::from_str(&set).ok()))
            }
        }
    }
}

/// The value of the first cookie called `name` in the request's Cookie headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (n, v) = (&pair[..eq], &pair[eq + 1..]);
            (n == name.as_bytes()).then(|| {
                // Go unquotes a quoted value.
                v.strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v)
            })
        })
}

fn hmac_hex(secret: &[u8], data: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, data.as_bytes());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// FNV-1a, 32 bits, as Go's hash/fnv.New32a.
pub(crate) fn fnv32a(parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in parts {
        for &b in *part {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

fn by_hash<C: Candidate>(pool: &[C], key: &str) -> Option<usize> {
    let mut best: Option<(u32, usize)> = None;
    for (i, up) in pool.iter().enumerate() {
        if !up.available() {
            continue;
        }
        let h = fnv32a(&[key.as_bytes(), up.dial().as_bytes()]);
        // Strictly greater, from zero: Caddy's comparison, ties go to the earlier upstream.
        if h > best.map_or(0, |(b, _)| b) {
            best = Some((h, i));
        }
    }
    best.map(|(_, i)| i)
}

fn random<C: Candidate>(pool: &[C]) -> Option<usize> {
    // Reservoir sampling over the available ones, as Caddy does.
    let mut rng = rand::rng();
    let mut chosen = None;
    let mut count = 0;
    for (i, up) in pool.iter().enumerate() {
        if !up.available() {
            continue;
        }
        count += 1;
        if rng.random_range(0..count) == 0 {
            chosen = Some(i);
        }
    }
    chosen
}

fn least_conn<C: Candidate>(pool: &[C]) -> Option<usize> {
    let mut rng = rand::rng();
    let mut best = None;
    let mut least = usize::MAX;
    let mut count = 0;
    for (i, up) in pool.iter().enumerate() {
        if !up.available() {
            continue;
        }
        let n = up.in_flight();
        if n < least {
            least = n;
            count = 0;
        }
        if n == least {
            count += 1;
            if rng.random_range(0..count) == 0 {
                best = Some(i);
            }
        }
    }
    best
}

fn random_choose<C: Candidate>(pool: &[C], k: usize) -> Option<usize> {
    let mut rng = rand::rng();
    let k = k.min(pool.len());
    let mut choices: Vec<Option<usize>> = vec![None; k];
    for (i, up) in pool.iter().enumerate() {
        if !up.available() {
            continue;
        }
        let j = rng.random_range(0..=i);
        if j < k {
            choices[j] = Some(i);
        }
    }
    let chosen: Vec<usize> = choices.into_iter().flatten().collect();
    if let Some(&idle) = chosen.iter().find(|&&i| pool[i].in_flight() == 0) {
        return Some(idle);
    }
    let least = chosen.iter().map(|&i| pool[i].in_flight()).min()?;
    let best: Vec<usize> = chosen
        .into_iter()
        .filter(|&i| pool[i].in_flight() == least)
        .collect();
    best.get(rng.random_range(0..best.len())).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Up(&'static str, bool, usize);

    impl Candidate for Up {
        fn dial(&self) -> &str {
            self.0
        }
        fn available(&self) -> bool {
            self.1
        }
        fn in_flight(&self) -> usize {
            self.2
        }
    }

    fn pick<'a>(headers: &'a HeaderMap, target: &'a str) -> Pick<'a> {
        Pick {
            peer: "10.0.0.1".parse().unwrap(),
            client: "10.0.0.1".parse().unwrap(),
            target,
            host: "example.org",
            headers,
        }
    }

    #[test]
    fn fnv_matches_gos_hash() {
        // Go: fnv.New32a() over "" and "a".
        assert_eq!(fnv32a(&[b""]), 0x811c9dc5);
        assert_eq!(fnv32a(&[b"a"]), 0xe40c292c);
        assert_eq!(fnv32a(&[b"foo", b"bar"]), fnv32a(&[b"foobar"]));
    }

    #[test]
    fn hash_policies_are_stable_spread_and_skip_unavailable_upstreams() {
        let pool = [Up("a:1", true, 0), Up("b:1", true, 0), Up("c:1", true, 0)];
        let h = HeaderMap::new();
        let mut seen = [0; 3];
        for n in 0..300 {
            let target = format!("/item/{n}");
            let one = Policy::UriHash.select(&pool, &pick(&h, &target)).unwrap().0;
            let two = Policy::UriHash.select(&pool, &pick(&h, &target)).unwrap().0;
            assert_eq!(one, two);
            seen[one] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        // Taking one away moves only its keys.
        let less = [Up("a:1", true, 0), Up("b:1", false, 0), Up("c:1", true, 0)];
        for n in 0..100 {
            let target = format!("/item/{n}");
            let before = Policy::UriHash.select(&pool, &pick(&h, &target)).unwrap().0;
            let after = Policy::UriHash.select(&less, &pick(&h, &target)).unwrap().0;
            assert_ne!(after, 1);
            if before != 1 {
                assert_eq!(before, after);
            }
        }
    }

    #[test]
    fn header_policy_without_the_header_still_chooses_an_available_upstream() {
        let pool = [Up("a:1", false, 0), Up("b:1", true, 0)];
        let policy = Policy::parse("header X-User").unwrap();
        let h = HeaderMap::new();
        for _ in 0..20 {
            assert_eq!(policy.select(&pool, &pick(&h, "/")).unwrap().0, 1);
        }
        let none = [Up("a:1", false, 0)];
        assert!(policy.select(&none, &pick(&h, "/")).is_none());
    }

    #[test]
    fn cookie_policy_sets_a_cookie_and_follows_it_back() {
        let pool = [Up("a:1", true, 0), Up("b:1", true, 0), Up("c:1", true, 0)];
        let policy = Policy::parse("cookie srv s3cret").unwrap();
        let h = HeaderMap::new();
        let (i, set) = policy.select(&pool, &pick(&h, "/")).unwrap();
        let set = set.unwrap();
        let set = set.to_str().unwrap();
        assert!(
            set.starts_with("srv=") && set.ends_with("; Path=/"),
            "{set}"
        );
        let value = set.trim_start_matches("srv=").trim_end_matches("; Path=/");
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; srv={value}")).unwrap(),
        );
        for _ in 0..10 {
            assert_eq!(policy.select(&pool, &pick(&h, "/")), Some((i, None)));
        }
        // A forged value chooses anew (and sets a new cookie).
        h.insert(header::COOKIE, HeaderValue::from_static("srv=00"));
        assert!(policy.select(&pool, &pick(&h, "/")).unwrap().1.is_some());
        assert!(!format!("{policy:?}").contains("s3cret"));
    }

    #[test]
    fn cookie_values_are_caddys_hmac_sha256_in_hex() {
        // RFC 4231-style check: HMAC-SHA256 with an empty key over an empty message.
        assert_eq!(
            hmac_hex(b"", ""),
            "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad"
        );
    }

    #[test]
    fn round_robin_starts_at_the_second_upstream_and_skips_unavailable_ones() {
        let pool = [Up("a:1", true, 0), Up("b:1", true, 0), Up("c:1", false, 0)];
        let policy = Policy::parse("round_robin").unwrap();
        let h = HeaderMap::new();
        let order: Vec<usize> = (0..4)
            .map(|_| policy.select(&pool, &pick(&h, "/")).unwrap().0)
            .collect();
        assert_eq!(order, [1, 0, 1, 0]);
    }

    #[test]
    fn least_conn_and_random_choose_prefer_idle_upstreams() {
        let pool = [Up("a:1", true, 3), Up("b:1", true, 0), Up("c:1", true, 5)];
        let h = HeaderMap::new();
        assert_eq!(
            Policy::LeastConn.select(&pool, &pick(&h, "/")).unwrap().0,
            1
        );
        // Caddy's random_choose samples slots by reservoir, so even with N = 3 of 3 a slot
        // may stay empty: the idle upstream wins two times in three, not always.
        let mut wins = [0u32; 3];
        for _ in 0..300 {
            wins[Policy::RandomChoose(3)
                .select(&pool, &pick(&h, "/"))
                .unwrap()
                .0] += 1;
        }
        assert!(wins[1] > wins[0] + wins[2], "{wins:?}");
    }

    #[test]
    fn bad_policies_are_refused() {
        for bad in [
            "weighted",
            "random_choose 1",
            "header",
            "cookie a b c",
            "first x",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }
}
