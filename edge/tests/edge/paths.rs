//! Path matchers see the path the way Caddy 2.6 does: percent-decoded, `.` and `..` resolved,
//! repeated slashes merged, trailing dots and spaces dropped, letters compared without regard
//! to ASCII case. The same Caddyfile is served by the edge and by Debian's `caddy`, and every
//! spelling of a protected path must get the same status from both. Requests go over a raw
//! socket (the differential harness), so no client tidies the path first.

use crate::differential::Both;

/// bcrypt of "hunter2" (`caddy hash-password`): requests carry no credentials, so it is never
/// computed; the test compares 401 with 200.
const HASH: &str = "$2a$14$jR7gOMLOFxeRcmzx.kmFVepFplxiH9ZBha7huZ4sGAuqy59ie9IY2";

/// Request targets spelling `/admin…` (protected) or something else in the ways a client can.
const TARGETS: &[&str] = &[
    "/admin/secret",
    "/admin",
    "/adminx",
    "/admi",
    "/public",
    "/%61dmin/secret",
    "/ad%6Din",
    "/%41dmin/secret",
    "/ADMIN/secret",
    "/Admin/secret",
    "//admin/secret",
    "///admin/secret",
    "/./admin/secret",
    "/x/../admin/secret",
    "/../admin/secret",
    "/%2e/admin/secret",
    "/%2e%2e/admin",
    "/x/%2e%2e/admin",
    "/x/.%2E/admin",
    "/x/..%2fadmin/secret",
    "/x/%2e%2e%2fadmin",
    "/%2fadmin/secret",
    "/%2Fadmin/secret",
    "/admin%2fsecret",
    "/admin%2f..%2fpublic",
    "/admin/../public",
    "/admin/secret/.",
    "/admin/..",
    "/x/..",
    "/admin.",
    "/admin./secret",
    "/admin%20",
    "/%20admin",
    "/.admin",
    "/admin;x",
    "/admin%00",
    "/%00admin",
    "/admin%ff",
    "/%C0%AFadmin",
    "/%5cadmin",
    "/%zzadmin/secret",
    "/admin%",
    "/admin/secret?x=/../public",
    "*",
    "http://plain.local/%61dmin/secret",
];

#[test]
fn every_spelling_of_a_protected_path_gets_the_same_status_from_edge_and_caddy() {
    let both = Both::start(&format!(
        "http://plain.local {{\n\tbasicauth /admin* {{\n\t\talice {HASH}\n\t}}\n\treverse_proxy @ECHO@\n}}\n"
    ));
    let pairs: Vec<_> = TARGETS.iter().map(|t| both.get(t)).collect();

    // Caddy itself protects the plain spelling and leaves the rest alone, so a mismatch below
    // is the edge's.
    pairs[0].caddy_status(401);
    pairs[4].caddy_status(200);
    let differ: Vec<String> = pairs
        .iter()
        .filter(|p| p.edge.status != p.caddy.status)
        .map(|p| {
            format!(
                "{}: edge {}, caddy {}",
                p.request, p.edge.status, p.caddy.status
            )
        })
        .collect();
    assert!(differ.is_empty(), "{}", differ.join("\n"));

    // Matching sees the cleaned path; the upstream gets the request line as sent.
    let forwarded = both.get("/x/..%2fpublic//a");
    forwarded.assert_same(&[]);
    assert!(
        forwarded.edge.text().starts_with("GET /x/..%2fpublic//a\n"),
        "{}",
        forwarded.edge
    );
    both.stop();
}
