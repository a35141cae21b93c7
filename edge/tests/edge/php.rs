//! `php_fastcgi` against Caddy 2.6 with the same real php-fpm (Debian's php8.2-fpm) behind
//! both: a WordPress-shaped site (`root` + `php_fastcgi` + `file_server`, a front controller
//! and static files) answers every request the same way from the edge and from Caddy, over a
//! TCP pool and a unix-socket pool.

use std::path::{Path, PathBuf};

use testkit::Scratch;
use testkit::php::PhpFpm;

use crate::differential::{Both, Req};
use crate::support::Upstreams;

/// The front controller: routes as WordPress's index.php does (home, pretty permalinks,
/// a 404 for the rest), takes form posts, and shows the CGI parameters a PHP app reads
/// (those that do not differ by server: no ports, no SERVER_SOFTWARE).
const FRONT: &str = r#"<?php
$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
header('Content-Type: text/html; charset=UTF-8');
if ($_SERVER['REQUEST_METHOD'] === 'POST') {
    $in = file_get_contents('php://input');
    error_log('a post of ' . strlen($in) . ' bytes');
    setcookie('comment_author', $_POST['author'] ?? 'none');
    echo 'posted ', strlen($in), ' ', md5($in), ' ', $_POST['title'] ?? '-', "\n";
} elseif (preg_match('#^/(\d{4})/(\d{2})/([a-z-]+)/$#', $path, $m)) {
    echo "<h1>post {$m[3]} of {$m[1]}-{$m[2]}</h1>\n";
} elseif ($path === '/' || $path === '/index.php') {
    echo "<h1>home</h1>\n";
} else {
    http_response_code(404);
    echo "<h1>not found</h1>\n";
}
foreach (['SCRIPT_NAME', 'SCRIPT_FILENAME', 'PATH_INFO', 'DOCUMENT_ROOT', 'DOCUMENT_URI',
          'REQUEST_URI', 'QUERY_STRING', 'REQUEST_METHOD', 'CONTENT_TYPE', 'CONTENT_LENGTH',
          'REMOTE_ADDR', 'HTTPS', 'HTTP_HOST', 'HTTP_X_FORWARDED_FOR', 'SERVER_NAME'] as $k) {
    echo $k, '=', $_SERVER[$k] ?? '(unset)', "\n";
}
"#;

/// A WordPress-shaped tree under `dir/site`, with a script outside it that must never run.
fn wordpress(dir: &Path) -> PathBuf {
    let root = dir.join("site");
    let write = |name: &str, body: &str| {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    };
    write("index.php", FRONT);
    write(
        "wp-admin/index.php",
        "<?php echo 'dashboard ', $_SERVER['SCRIPT_NAME'], \"\\n\";",
    );
    write(
        "wp-login.php",
        "<?php echo 'login ', $_SERVER['PATH_INFO'] ?? '', ' ', $_SERVER['SCRIPT_NAME'], \"\\n\";",
    );
    write(
        "wp-content/themes/twenty/style.css",
        "body { color: #123; }\n",
    );
    write(
        "wp-content/uploads/2024/photo.jpg",
        "<?php echo 'IMAGE ' . 'EXECUTED';",
    );
    write("wp-content/uploads/index.html", "<p>uploads</p>\n");
    std::fs::write(
        dir.join("outside.php"),
        "<?php echo 'OUTSIDE ' . 'EXECUTED';",
    )
    .unwrap();
    root
}

#[test]
fn a_wordpress_shaped_site_answers_through_php_fpm_as_caddy_does() {
    let dir = Scratch::new("edge-php").unwrap();
    let root = wordpress(dir.path());
    let fpm = PhpFpm::start(&dir, 2).expect("php-fpm starts");
    let both = Both::start_with(
        Upstreams::new(),
        "http://plain.local {\n\troot * @ROOT@\n\tencode gzip\n\tphp_fastcgi 127.0.0.1:@FPM@\n\tfile_server\n}\n\n\
         http://unix.local {\n\troot * @ROOT@\n\tphp_fastcgi unix/@SOCK@ {\n\t\tenv APP_ENV test\n\t}\n\tfile_server\n}\n",
        &[
            ("@ROOT@", root.display().to_string()),
            ("@FPM@", fpm.port.to_string()),
            ("@SOCK@", fpm.socket.display().to_string()),
        ],
    );
    let php = ["content-type", "location", "x-powered-by", "set-cookie"];
    let stat = [
        "content-type",
        "content-length",
        "etag",
        "last-modified",
        "location",
    ];
    for host in ["plain.local", "unix.local"] {
        let get = |target: &str| both.request(&Req::get(target).host(Some(host)));
        // The home page and the front controller named.
        get("/").caddy_status(200).assert_same(&php);
        assert!(get("/").edge.text().contains("<h1>home</h1>"));
        get("/index.php").caddy_status(200).assert_same(&php);
        get("/index.php?p=7&x=%20y").assert_same(&php);
        // A pretty permalink goes to index.php, REQUEST_URI as asked.
        let pair = get("/2024/01/hello/");
        pair.caddy_status(200).assert_same(&php);
        assert!(
            pair.edge.text().contains("post hello of 2024-01"),
            "{}",
            pair.edge
        );
        get("/2024/01/hello/?replytocom=3").assert_same(&php);
        // A static file, from file_server, with its validators.
        get("/wp-content/themes/twenty/style.css")
            .caddy_status(200)
            .assert_same(&stat);
        // A folder without an index script is the front controller's too (try_files falls
        // back to index.php before file_server could list or index it).
        get("/wp-content/uploads/")
            .caddy_status(404)
            .assert_same(&php);
        // A folder with an index script: the slash form first, then the script.
        get("/wp-admin").caddy_status(308).assert_same(&stat);
        get("/wp-admin?x=1").caddy_status(308).assert_same(&stat);
        get("/wp-admin/").caddy_status(200).assert_same(&php);
        // A missing script goes to the front controller, which answers 404.
        get("/missing.php").caddy_status(404).assert_same(&php);
        get("/no/such/page").caddy_status(404).assert_same(&php);
        // PATH_INFO after a script.
        get("/wp-login.php/extra/path?a=b")
            .caddy_status(200)
            .assert_same(&php);
    }

    // What an attacker tries: an upload run as PHP through a split path, scripts outside the
    // root through `..` and encoded slashes and dots.
    for target in [
        "/wp-content/uploads/2024/photo.jpg/.php",
        "/wp-content/uploads/2024/photo.jpg/x.php",
        "/wp-content/uploads/2024/photo.jpg%00.php",
        "/wp-content/uploads/2024/photo.jpg",
        "/../outside.php",
        "/%2e%2e/outside.php",
        "/..%2foutside.php",
        "/wp-admin/..%2f..%2foutside.php",
        "/index.php/../../outside.php",
        "/INDEX.PHP",
    ] {
        let pair = both.get(target);
        pair.assert_same_head(&php);
        for reply in [&pair.edge, &pair.caddy] {
            let text = reply.text();
            assert!(
                !text.contains(" EXECUTED"),
                "{target}: a file that is not a script of the site ran:\n{reply}"
            );
        }
        assert_eq!(pair.edge.body, pair.caddy.body, "{target}");
    }

    // Form posts, small and large, with PHP writing to its error log on the way.
    both.request(
        &Req::new("POST", "/index.php")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("title=Hello+World&author=me"),
    )
    .caddy_status(200)
    .assert_same(&php);
    both.request(
        &Req::new("POST", "/2024/01/hello/")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("title=Comment&author=you"),
    )
    .caddy_status(200)
    .assert_same(&php);
    let big: String = (0..2_000_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    both.request(
        &Req::new("POST", "/")
            .header("Content-Type", "application/octet-stream")
            .body(big),
    )
    .caddy_status(200)
    .assert_same(&php);
    both.stop();
}
