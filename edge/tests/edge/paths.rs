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

/// Request targets whose path holds escapes: spaces, dot segments, an encoded slash, a doubly
/// encoded dot, UTF-8, an encoded `?` and `#`, repeated slashes.
const ENCODED: &[&str] = &[
    "/a%20b/%2e%2e/c",
    "/a%2Fb/c",
    "/x/%252e%252e/y",
    "/caf%C3%A9/menu",
    "/a//b/",
    "/%3Fq%23f",
    "/plain?x=%20y&z=1",
    "/",
];

#[test]
fn path_placeholders_are_percent_decoded_as_caddy_gives_them() {
    let both = Both::start(
        "http://plain.local {\n\trespond \"path={path} dir={dir} file={file} p0={path.0} p1={path.1} p2={path.2} uri={uri} query={query} q={query.x}\"\n}\n",
    );
    for target in ENCODED {
        both.get(target).assert_same(&[]).caddy_status(200);
    }
    let pair = both.get("/a%20b");
    assert!(pair.edge.text().starts_with("path=/a b "), "{}", pair.edge);
    // A malformed escape is a bad request on both (Go cannot parse the target).
    both.get("/a%zzb").assert_same_head(&[]).caddy_status(400);
    both.stop();
}

#[test]
fn a_decoded_path_in_a_query_or_a_file_lookup_is_what_caddy_makes_of_it() {
    let root = testkit::Scratch::new("edge-decoded-path").unwrap();
    std::fs::write(root.join("a b.txt"), "spaced\n").unwrap();
    std::fs::write(root.join("index.html"), "index\n").unwrap();
    let both = Both::start_with(
        crate::support::Upstreams::new(),
        "http://plain.local {\n\troot * @ROOT@\n\thandle /q/* {\n\t\trewrite * /echo?p={path}\n\t\treverse_proxy @ECHO@\n\t}\n\thandle {\n\t\ttry_files {path} /index.html\n\t\tfile_server\n\t}\n}\n",
        &[("@ROOT@", root.path().display().to_string())],
    );
    // `{path}` in a query is decoded, then query-escaped.
    both.get("/q/a%20b%2Fc").assert_same(&[]).caddy_status(200);
    // try_files looks for the decoded name, and dot segments stay under the root.
    let pair = both.get("/a%20b.txt");
    pair.assert_same(&[]).caddy_status(200);
    assert_eq!(pair.edge.text(), "spaced\n");
    for target in [
        "/%2e%2e/%2e%2e/etc/passwd",
        "/..%2F..%2Fetc%2Fpasswd",
        "/nothing",
    ] {
        let pair = both.get(target);
        pair.assert_same(&[]).caddy_status(200);
        assert_eq!(pair.edge.text(), "index\n", "{target}");
    }
    both.stop();
}

#[test]
fn a_decoded_path_never_makes_a_rewritten_target_or_a_root_reach_what_the_raw_one_hid() {
    let top = testkit::Scratch::new("edge-decoded-root").unwrap();
    std::fs::create_dir_all(top.join("sites/a/r/a")).unwrap();
    std::fs::write(top.join("sites/a/r/a/page.txt"), "page of a\n").unwrap();
    std::fs::create_dir_all(top.join("r")).unwrap();
    std::fs::write(top.join("r/secret.txt"), "SECRET\n").unwrap();
    let both = Both::start_with(
        crate::support::Upstreams::new(),
        "http://plain.local {\n\
         \thandle /go/* {\n\t\trewrite * /static{path}\n\t\trespond /admin* \"admin\"\n\t\trespond \"other {path}\"\n\t}\n\
         \thandle /r/* {\n\t\troot * @TOP@/sites/{path.1}\n\t\tfile_server\n\t}\n\
         \thandle /html/* {\n\t\tredir /to{path} html\n\t}\n\
         }\n",
        &[("@TOP@", top.path().display().to_string())],
    );
    // Decoding `%252e` in the rewritten target would make `/static/go/../../admin`, i.e. /admin.
    let pair = both.get("/go/%252e%252e/%252e%252e/admin");
    assert_eq!(pair.edge.status, 200, "{}", pair.edge);
    assert!(pair.edge.text().starts_with("other "), "{}", pair.edge);
    both.get("/go/plain").assert_same(&[]).caddy_status(200);
    // `{path.1}` of `/r/%2e%2e/r/secret.txt` is `..` (the path matched is /r/secret.txt):
    // the root stays inside sites/ rather than becoming its parent.
    let ok = both.get("/r/a/page.txt");
    ok.assert_same(&[]).caddy_status(200);
    assert_eq!(ok.edge.text(), "page of a\n");
    let pair = both.get("/r/%2e%2e/r/secret.txt");
    assert_eq!(pair.edge.status, 404, "{}", pair.edge);
    assert!(!pair.edge.text().contains("SECRET"));
    // A decoded `"` or `<` in redir's page is escaped.
    let pair = both.get("/html/%22%3E%3Cscript%3Ealert(1)%3C/script%3E");
    assert_eq!(pair.edge.status, 200, "{}", pair.edge);
    assert!(!pair.edge.text().contains("<script>alert"), "{}", pair.edge);
    assert!(
        pair.edge.text().contains("&#34;&gt;&lt;script&gt;"),
        "{}",
        pair.edge
    );
    both.stop();
}
