//! The admin listener against hostile callers: purges need the token when one is set,
//! no web page can purge (forms, cross-site fetches), a public admin port without a
//! token is refused at start, and purges say exactly what they removed: by tag through
//! an index, by URL keyed as requests are (host, keyed headers), in Redis too.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use corral::config::{Config, Environment};
use corral::RunningServer;

use crate::support::eventually;
use crate::support::raw::{exchange, Answer, RecordingOrigin, Wire};
use crate::support::redis::RedisServer;

const TOKEN: &str = "s3cret-admin-token-0123456789abcdef";

/// corral on free ports in front of `origin`, with `top` lines before any table and
/// `routes` (where `{upstream}` is the origin's URL).
async fn corral(top: &str, routes: &str, origin: &RecordingOrigin) -> RunningServer {
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n{top}\n{}",
        routes.replace("{upstream}", &origin.url())
    );
    let config = Config::parse(&text, "admin-test.toml").expect("test config is valid");
    let server = corral::start(&config).await.expect("corral starts");
    if let Some(fleet) = server.proxy().redis() {
        let fleet = Arc::clone(fleet);
        eventually("the instance joins the fleet", || {
            let ready = fleet.ready();
            async move { ready.then_some(()) }
        })
        .await;
    }
    server
}

const ONE_ROUTE: &str = "[[route]]\nname = \"t\"\nupstream = \"{upstream}\"\n";

fn admin(server: &RunningServer) -> SocketAddr {
    server.admin_addr().expect("admin listener")
}

/// A GET of `path` with extra header lines (each ending in CRLF).
async fn get(server: &RunningServer, path: &str, lines: &str) -> Wire {
    let raw = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{lines}\r\n");
    exchange(server.listen_addr(), raw.as_bytes()).await
}

/// A `POST /purge?{query}` with extra header lines (each ending in CRLF).
async fn purge(server: &RunningServer, query: &str, lines: &str) -> Wire {
    let raw = format!(
        "POST /purge?{query} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n{lines}\r\n"
    );
    exchange(admin(server), raw.as_bytes()).await
}

fn bearer(token: &str) -> String {
    format!("authorization: Bearer {token}\r\n")
}

/// Whether a GET of `path` is answered from the cache.
async fn cached(server: &RunningServer, path: &str, lines: &str) -> bool {
    get(server, path, lines)
        .await
        .cache_status()
        .starts_with("corral; hit")
}

#[tokio::test]
async fn purge_needs_the_token_when_one_is_set() {
    let origin = RecordingOrigin::start().await;
    let server = corral(&format!("admin_token = \"{TOKEN}\""), ONE_ROUTE, &origin).await;
    get(&server, "/a", "").await;
    let query = "route=t&host=127.0.0.1&path=/a";

    let none = purge(&server, query, "").await;
    assert_eq!(none.status, 401, "{none:?}");
    assert_eq!(
        none.header("www-authenticate"),
        Some("Bearer realm=\"corral-admin\"")
    );
    let wrong = purge(
        &server,
        query,
        &bearer("s3cret-admin-token-0123456789abcdeX"),
    )
    .await;
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert!(wrong
        .header("www-authenticate")
        .is_some_and(|v| v.contains("invalid_token")));
    let basic = purge(&server, query, &format!("authorization: Basic {TOKEN}\r\n")).await;
    assert_eq!(basic.status, 401, "only the Bearer scheme: {basic:?}");
    assert!(
        cached(&server, "/a", "").await,
        "refused purges change nothing"
    );

    let right = purge(&server, query, &bearer(TOKEN)).await;
    assert_eq!(right.status, 200, "{right:?}");
    assert_eq!(right.text(), "purged route=t path=/a local=1\n");
    assert!(!cached(&server, "/a", "").await, "the entry is gone");
    // Health, readiness and metrics stay open for probes and scrapers.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let raw = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        assert_eq!(
            exchange(admin(&server), raw.as_bytes()).await.status,
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn purges_from_web_pages_are_refused_even_without_a_token() {
    let origin = RecordingOrigin::start().await;
    let server = corral("", ONE_ROUTE, &origin).await;
    get(&server, "/a", "").await;
    let query = "route=t&host=127.0.0.1&path=/a";
    for (lines, status) in [
        // A cross-site HTML form: Origin and a form content type.
        (
            "origin: https://evil.example\r\ncontent-type: application/x-www-form-urlencoded\r\n",
            403,
        ),
        // Each mark alone is enough: old browsers send no Origin with a form...
        ("content-type: application/x-www-form-urlencoded\r\n", 415),
        ("content-type: multipart/form-data; boundary=x\r\n", 415),
        ("content-type: text/plain\r\n", 415),
        // ...a no-cors fetch sends no content type, but always an Origin (maybe "null").
        ("origin: null\r\n", 403),
        ("sec-fetch-site: cross-site\r\n", 403),
        ("sec-fetch-site: same-site\r\n", 403),
    ] {
        let res = purge(&server, query, lines).await;
        assert_eq!(res.status, status, "{lines:?}: {res:?}");
    }
    assert!(
        cached(&server, "/a", "").await,
        "no refused purge went through"
    );
    // No preflight succeeds, so a page cannot send anything else either.
    let preflight = exchange(
        admin(&server),
        b"OPTIONS /purge HTTP/1.1\r\nhost: x\r\norigin: https://evil.example\r\naccess-control-request-method: POST\r\n\r\n",
    )
    .await;
    assert_eq!(preflight.status, 405);
    assert_eq!(preflight.header("allow"), Some("POST"));
    assert!(preflight.header("access-control-allow-origin").is_none());
    // A plain command-line purge works.
    assert_eq!(purge(&server, query, "").await.status, 200);
}

/// Runs `corral` with `args` and `CORRAL_ADMIN_TOKEN` set to `env_token` (in the child
/// only: this process's environment is shared by every test thread).
fn run_corral(args: &[&str], env_token: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corral"));
    cmd.args(args).env_remove("CORRAL_ADMIN_TOKEN");
    if let Some(token) = env_token {
        cmd.env("CORRAL_ADMIN_TOKEN", token);
    }
    let out = cmd.output().expect("corral runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn public_admin_listen_without_a_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("public.toml");
    let public = "listen = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\n[[route]]\nname = \"t\"\nupstream = \"http://127.0.0.1:9\"\n";
    std::fs::write(&file, public).unwrap();
    let path = file.to_str().unwrap();

    let (ok, _, stderr) = run_corral(&["--config", path], None);
    assert!(!ok, "corral must not start: {stderr}");
    assert!(
        stderr.contains(&format!("{path}:2:")) && stderr.contains("admin_listen"),
        "names file, line and key: {stderr}"
    );
    let (ok, _, stderr) = run_corral(&["check", path], None);
    assert!(
        !ok && stderr.contains("admin_listen"),
        "check too: {stderr}"
    );

    // The environment's token is enough, and is never printed.
    let (ok, stdout, stderr) = run_corral(&["check", path], Some(TOKEN));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("admin token: set (CORRAL_ADMIN_TOKEN"),
        "{stdout}"
    );
    assert!(!stdout.contains(TOKEN) && !stderr.contains(TOKEN));
    // So is the file's, also never printed.
    std::fs::write(&file, format!("admin_token = \"{TOKEN}\"\n{public}")).unwrap();
    let (ok, stdout, stderr) = run_corral(&["check", path], None);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("admin token: set (admin_token)"),
        "{stdout}"
    );
    assert!(!stdout.contains(TOKEN) && !stderr.contains(TOKEN));

    // The same decision through the library, with the environment passed in.
    assert!(Config::parse(public, "p.toml").is_err());
    let env = Environment {
        admin_token: Some(TOKEN.into()),
    };
    let config = Config::parse_with(public, "p.toml", &env).unwrap();
    assert!(config
        .admin_token
        .is_some_and(|t| t.matches(TOKEN.as_bytes())));
}

#[tokio::test]
async fn purge_counts_the_entries_it_removed_with_their_variants() {
    let origin = RecordingOrigin::answering(Answer {
        headers: vec![
            ("cache-control".into(), "max-age=60".into()),
            ("vary".into(), "accept-language".into()),
        ],
        ..Answer::default()
    })
    .await;
    let server = corral("", ONE_ROUTE, &origin).await;
    for lang in ["en", "fr", "de"] {
        get(&server, "/v", &format!("accept-language: {lang}\r\n")).await;
        assert!(cached(&server, "/v", &format!("accept-language: {lang}\r\n")).await);
    }
    let query = "route=t&host=127.0.0.1&path=/v";
    let soft = purge(&server, &format!("{query}&soft=true"), "").await;
    assert_eq!(soft.text(), "soft-purged route=t path=/v local=3\n");
    let hard = purge(&server, query, "").await;
    assert_eq!(hard.text(), "purged route=t path=/v local=3\n");
    let again = purge(&server, query, "").await;
    assert_eq!(
        again.text(),
        "purged route=t path=/v local=0\n",
        "nothing left"
    );
    assert!(!cached(&server, "/v", "accept-language: fr\r\n").await);
}

#[tokio::test]
async fn purge_host_is_normalised_as_request_hosts_are() {
    let origin = RecordingOrigin::start().await;
    let routes = "[[route]]\nname = \"shop\"\nhost = \"shop.example\"\nupstream = \"{upstream}\"\n\
                  [[route]]\nname = \"any\"\nupstream = \"{upstream}\"\n";
    let server = corral("", routes, &origin).await;
    let fetch = |host: &'static str| {
        let raw = format!("GET /p HTTP/1.1\r\nhost: {host}\r\n\r\n");
        let addr = server.listen_addr();
        async move { exchange(addr, raw.as_bytes()).await }
    };
    fetch("Shop.Example:8080").await;
    assert!(fetch("shop.example")
        .await
        .cache_status()
        .starts_with("corral; hit"));
    let res = purge(&server, "route=shop&host=SHOP.example.:8080&path=/p", "").await;
    assert_eq!(res.text(), "purged route=shop path=/p local=1\n");
    assert!(!fetch("shop.example").await.cache_status().contains("hit"));

    fetch("Other.Example.").await;
    let res = purge(&server, "route=any&host=other.example:443&path=/p", "").await;
    assert_eq!(res.text(), "purged route=any path=/p local=1\n");
    // A host that another route serves has no key on this one: not "purged".
    let res = purge(&server, "route=any&host=shop.example&path=/p", "").await;
    assert_eq!(res.status, 400, "{res:?}");
    assert!(
        res.text().contains("served by route \"shop\""),
        "{}",
        res.text()
    );
}

#[tokio::test]
async fn purge_on_a_route_keyed_by_headers_needs_their_values() {
    let origin = RecordingOrigin::start().await;
    let routes = format!("{ONE_ROUTE}key = {{ headers = [\"x-tenant\"] }}\n");
    let server = corral("", &routes, &origin).await;
    for tenant in ["x-tenant: a\r\n", "x-tenant: b\r\n", ""] {
        get(&server, "/p", tenant).await;
    }
    let base = "route=t&host=127.0.0.1&path=/p";
    let res = purge(&server, base, "").await;
    assert_eq!(
        res.status, 400,
        "never 'purged' for a key that cannot match"
    );
    assert!(res.text().contains("header=NAME:VALUE") && res.text().contains("x-tenant"));
    let res = purge(&server, &format!("{base}&header=x-other:1"), "").await;
    assert_eq!(res.status, 400, "{res:?}");

    let res = purge(&server, &format!("{base}&header=X-Tenant:a"), "").await;
    assert_eq!(res.text(), "purged route=t path=/p local=1\n");
    assert!(!cached(&server, "/p", "x-tenant: a\r\n").await);
    assert!(
        cached(&server, "/p", "x-tenant: b\r\n").await,
        "other tenants stay"
    );
    // An empty value is the key of requests without the header.
    let res = purge(&server, &format!("{base}&header=x-tenant:"), "").await;
    assert_eq!(res.text(), "purged route=t path=/p local=1\n");
    assert!(cached(&server, "/p", "x-tenant: b\r\n").await);
}

/// A route with `key.cookies` keys each variant on those cookies' values: a purge
/// without them would remove nothing while saying "purged".
#[tokio::test]
async fn purge_on_a_route_keyed_by_cookies_needs_their_values() {
    let origin = RecordingOrigin::start().await;
    let routes = format!("{ONE_ROUTE}key = {{ cookies = [\"lang\"] }}\n");
    let server = corral("", &routes, &origin).await;
    for lang in ["cookie: lang=en\r\n", "cookie: lang=fr\r\n", ""] {
        get(&server, "/p", lang).await;
        assert!(cached(&server, "/p", lang).await, "{lang:?}");
    }
    let base = "route=t&host=127.0.0.1&path=/p";
    let res = purge(&server, base, "").await;
    assert_eq!(
        res.status, 400,
        "never 'purged' for a key that cannot match"
    );
    assert!(
        res.text().contains("cookie=NAME:VALUE") && res.text().contains("lang"),
        "{res:?}"
    );
    let res = purge(&server, &format!("{base}&cookie=session:1"), "").await;
    assert_eq!(res.status, 400, "{res:?}");
    assert!(cached(&server, "/p", "cookie: lang=en\r\n").await);

    let res = purge(&server, &format!("{base}&cookie=lang:en"), "").await;
    assert_eq!(res.text(), "purged route=t path=/p local=1\n");
    assert!(!cached(&server, "/p", "cookie: lang=en\r\n").await);
    assert!(
        cached(&server, "/p", "cookie: lang=fr\r\n").await,
        "other languages stay"
    );
    // An empty value is the key of requests without the cookie.
    let res = purge(&server, &format!("{base}&cookie=lang:"), "").await;
    assert_eq!(res.text(), "purged route=t path=/p local=1\n");
    assert!(cached(&server, "/p", "cookie: lang=fr\r\n").await);
}

#[tokio::test]
async fn bad_purges_say_what_is_wrong() {
    let origin = RecordingOrigin::start().await;
    let routes = "[[route]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"{upstream}\"\n\
                  [[route]]\nname = \"site\"\nupstream = \"{upstream}\"\n";
    let server = corral("", routes, &origin).await;
    for (query, status, says) in [
        ("route=nope&host=h&path=/x", 404, "no route named \"nope\""),
        ("route=site&path=/x", 400, "give host=H"),
        (
            "route=site&host=h&path=/api/x",
            400,
            "served by route \"api\"",
        ),
        ("route=api&host=h&path=/x", 400, "served by route \"site\""),
        ("route=site&host=h&path=x", 400, "bad path"),
        (
            "route=site&host=h&path=/x&paht=/y",
            400,
            "unknown parameter \"paht\"",
        ),
        ("route=site&host=a%20b&path=/x", 400, "bad host"),
        ("tag=", 400, "bad tag"),
        ("", 400, "give either tag=T"),
    ] {
        let res = purge(&server, query, "").await;
        assert_eq!(res.status, status, "{query}: {res:?}");
        assert!(res.text().contains(says), "{query}: {}", res.text());
    }
}

/// A route whose responses carry the tags `tags` in `Surrogate-Key`.
async fn tagging_origin(tags: &str) -> RecordingOrigin {
    RecordingOrigin::answering(Answer {
        headers: vec![
            ("cache-control".into(), "max-age=600".into()),
            ("surrogate-key".into(), tags.into()),
        ],
        ..Answer::default()
    })
    .await
}

const TAGGED_ROUTE: &str =
    "[[route]]\nname = \"t\"\nupstream = \"{upstream}\"\ntag_header = \"surrogate-key\"\n";

#[tokio::test]
async fn tag_purge_finds_its_entries_through_the_index() {
    let origin = tagging_origin("all page").await;
    let server = corral("", TAGGED_ROUTE, &origin).await;
    let local = server.proxy().cache().local().clone();
    for i in 0..500 {
        get(&server, &format!("/p{i}"), "").await;
    }
    origin.set_answer(Answer::default());
    get(&server, "/untagged", "").await;
    assert_eq!(local.index_records(), 1000, "two tags of 500 entries");

    let res = purge(&server, "tag=all", "").await;
    assert_eq!(res.text(), "purged tag=all local=500\n");
    assert_eq!(
        local.index_records(),
        0,
        "the removed entries left the index"
    );
    assert!(!cached(&server, "/p7", "").await);
    assert!(
        cached(&server, "/untagged", "").await,
        "untagged entries stay"
    );
    let res = purge(&server, "tag=page", "").await;
    assert_eq!(res.text(), "purged tag=page local=0\n");
}

#[tokio::test]
async fn tag_index_forgets_evicted_entries() {
    let origin = tagging_origin("a b c").await;
    // Room for a few dozen entries: most of what is filled is evicted.
    let server = corral("[cache]\nmax_bytes = \"64KiB\"", TAGGED_ROUTE, &origin).await;
    let local = server.proxy().cache().local().clone();
    for i in 0..1000 {
        get(&server, &format!("/p{i}"), "").await;
    }
    local.sync();
    let entries = local.entry_count() as usize;
    assert!(entries < 500, "{entries} entries stayed");
    assert_eq!(
        local.index_records(),
        3 * entries,
        "three tags per entry held"
    );
}

#[tokio::test]
async fn many_tags_are_bounded_and_written_to_redis_in_one_transaction() {
    let redis = RedisServer::start().await;
    let tags: Vec<String> = (0..5000).map(|i| format!("t{i}")).collect();
    let origin = tagging_origin(&tags.join(" ")).await;
    let top = format!(
        "[redis]\nurl = \"{}\"\nkey_prefix = \"adm:\"\ncommand_timeout = \"2s\"",
        redis.url()
    );
    let routes = format!("{TAGGED_ROUTE}max_tags = 8\n");
    let server = corral(&top, &routes, &origin).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let before = command_calls(&mut conn).await;
    let res = get(&server, "/p", "").await;
    assert_eq!(res.status, 200);
    let tag_keys: Vec<String> = eventually("the tags reach redis", || {
        let mut conn = conn.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("adm:tag:*")
                .query_async(&mut conn)
                .await
                .ok()?;
            (keys.len() >= 8).then_some(keys)
        }
    })
    .await;
    let after = command_calls(&mut conn).await;
    let mut tag_keys = tag_keys;
    tag_keys.sort();
    let mut want: Vec<String> = (0..8).map(|i| format!("adm:tag:t{i}")).collect();
    want.sort();
    assert_eq!(tag_keys, want, "the first 8 tags, no more");
    let delta = |cmd: &str| after.get(cmd).unwrap_or(&0) - before.get(cmd).unwrap_or(&0);
    assert_eq!(delta("exec"), 1, "one transaction for all the tags");
    // 8 tag sets, plus the fenced write's own variant set.
    assert!(delta("sadd") <= 9, "sadd calls: {}", delta("sadd"));
    let ttl: i64 = redis::cmd("PTTL")
        .arg("adm:tag:t0")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "tag sets expire with their entries (pttl {ttl})");
    let metrics = exchange(admin(&server), b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(
        metrics
            .text()
            .contains("corral_tags_dropped_total{route=\"t\"} 4992"),
        "the dropped tags are counted"
    );
}

/// `INFO commandstats` as command -> calls.
async fn command_calls(
    conn: &mut redis::aio::MultiplexedConnection,
) -> std::collections::HashMap<String, i64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_tag_purge_counts_redis_and_reaches_every_instance() {
    let redis = RedisServer::start().await;
    let origin = tagging_origin("product-7").await;
    let top = format!(
        "[redis]\nurl = \"{}\"\ncommand_timeout = \"2s\"\nretry_after = \"200ms\"",
        redis.url()
    );
    let a = corral(&top, TAGGED_ROUTE, &origin).await;
    let b = corral(&top, TAGGED_ROUTE, &origin).await;
    for path in ["/x", "/y", "/z"] {
        get(&a, path, "").await;
        eventually("the entry is shared", || async {
            cached(&b, path, "").await.then_some(())
        })
        .await;
    }
    // A member that is no key corral wrote (not even text) is skipped, not an outage.
    let mut planter = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("SADD")
        .arg("corral:tag:product-7")
        .arg(&b"\xff\xfe"[..])
        .query_async::<()>(&mut planter)
        .await
        .unwrap();
    let res = purge(&b, "tag=product-7", "").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.text(), "purged tag=product-7 local=3 shared=3\n");
    for path in ["/x", "/y", "/z"] {
        eventually("the other instance dropped its copy", || async {
            (!cached(&a, path, "").await).then_some(())
        })
        .await;
    }
    redis_down_purge_says_so(redis, &b).await;
}

/// With Redis gone, a purge still empties this instance but answers 503: the fleet
/// may still serve the entries.
async fn redis_down_purge_says_so(mut redis: RedisServer, server: &RunningServer) {
    redis.kill();
    let res = purge(server, "route=t&host=127.0.0.1&path=/x", "").await;
    assert_eq!(res.status, 503, "{res:?}");
    assert!(
        res.text().ends_with("shared=unavailable\n"),
        "{}",
        res.text()
    );
}
