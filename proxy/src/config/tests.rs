//! Unit tests of parsing and validation, from TOML text as an operator writes it.

use super::values::without_userinfo;
use super::*;

const MINIMAL: &str = "listen = \"127.0.0.1:8080\"\n[[route]]\nname = \"api\"\nupstream = \"http://127.0.0.1:9000\"\n";

fn err(text: &str) -> ConfigError {
    Config::parse(text, "test.toml").expect_err("config should be refused")
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::parse(MINIMAL, "test.toml").unwrap();
    let r = &c.routes[0];
    assert_eq!(r.path_prefix, "/");
    assert_eq!(r.ttl, Duration::from_secs(60));
    assert_eq!(r.key_query, QueryMode::Keep);
    assert!(r.cache);
    assert_eq!(c.cache.max_bytes, 256 * 1024 * 1024);
    assert_eq!(r.on_wait_timeout, OnWaitTimeout::Fetch);
}

// Each settings type's defaults are what validation gives a file that leaves them out.

#[test]
fn a_minimal_file_is_config_new() {
    let route = RouteConfig::new("api", http::Uri::from_static("http://127.0.0.1:9000"));
    let expected = Config::new("127.0.0.1:8080".parse().unwrap(), vec![route]);
    assert_eq!(Config::parse(MINIMAL, "test.toml").unwrap(), expected);
}

#[test]
fn a_route_without_settings_is_route_config_new() {
    let text = "listen = \"127.0.0.1:1\"\n[[route]]\nname = \"r\"\nupstream = \"http://u\"\n";
    let c = Config::parse(text, "t").unwrap();
    assert_eq!(
        c.routes[0],
        RouteConfig::new("r", http::Uri::from_static("http://u"))
    );
    assert_eq!(c.routes[0], test_route());
}

#[test]
fn no_cache_section_is_cache_settings_default() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(c.cache, CacheSettings::default());
}

#[test]
fn no_lock_section_is_lock_settings_default() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert_eq!(c.lock, LockSettings::default());
    let with_redis = MINIMAL.replacen('\n', "\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n", 1);
    let c = Config::parse(&with_redis, "t").unwrap();
    assert_eq!(c.lock, LockSettings::default());
}

#[test]
fn a_redis_section_with_only_a_url_is_redis_settings_new() {
    let url = "redis://127.0.0.1:6379";
    let text = MINIMAL.replacen('\n', &format!("\n[redis]\nurl = \"{url}\"\n"), 1);
    let c = Config::parse(&text, "t").unwrap();
    assert_eq!(c.redis, Some(RedisSettings::new(url)));
    assert_eq!(c.redis, RedisSettings::from_url(url).ok());
}

#[test]
fn the_demo_redis_url_is_checked_like_the_file() {
    let message = RedisSettings::from_url("http://nope").unwrap_err();
    assert!(message.starts_with("invalid Redis URL ("), "{message}");
    // A TOML string cannot carry a control character, so the file refuses it; the
    // command line must too.
    let message = RedisSettings::from_url("redis://127.0.0.1:6379/0\u{7}").unwrap_err();
    assert!(message.contains("control character"), "{message}");
}

#[test]
fn workers_default_to_the_cores_and_must_be_sensible() {
    assert_eq!(Config::parse(MINIMAL, "test.toml").unwrap().workers, None);
    let c = Config::parse(&format!("workers = 3\n{MINIMAL}"), "test.toml").unwrap();
    assert_eq!(c.workers, Some(3));
    for bad in ["0", "5000", "-1", "\"two\""] {
        let e = err(&format!("workers = {bad}\n{MINIMAL}"));
        assert_eq!(e.line(), Some(1), "{bad}: {e}");
        assert!(e.to_string().contains("workers"), "{bad}: {e}");
    }
}

#[test]
fn syntax_error_names_file_and_line() {
    let e = err("listen = \"127.0.0.1:8080\"\n[[route]]\nname = \n");
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(e.to_string().starts_with("test.toml:3:"), "{e}");
}

#[test]
fn unknown_key_names_the_key_and_line() {
    let e = err(&format!("{MINIMAL}tll = \"5s\"\n"));
    assert_eq!(e.key(), Some("route[0].tll"), "{e}");
    assert_eq!(e.line(), Some(5));
    assert!(e.to_string().contains("unknown field"), "{e}");
}

#[test]
fn unknown_top_level_section_is_refused() {
    let e = err(&format!("[cahce]\nmax_bytes = \"1MiB\"\n{MINIMAL}"));
    assert_eq!(e.line(), Some(1), "{e}");
}

#[test]
fn bad_duration_names_route_key() {
    let e = err(&format!("{MINIMAL}ttl = \"soon\"\n"));
    assert_eq!(e.key(), Some("route[0].ttl"));
    assert_eq!(e.line(), Some(5));
    assert!(e.to_string().contains("invalid duration"), "{e}");
}

#[test]
fn zero_and_negative_ttl_are_refused() {
    assert_eq!(
        err(&format!("{MINIMAL}ttl = \"0s\"\n")).key(),
        Some("route[0].ttl")
    );
    assert_eq!(
        err(&format!("{MINIMAL}ttl = \"-5s\"\n")).key(),
        Some("route[0].ttl")
    );
}

#[test]
fn bad_size_and_object_larger_than_cache_are_refused() {
    let e = err("listen = \"127.0.0.1:8080\"\n[cache]\nmax_bytes = \"lots\"\n[[route]]\nname = \"a\"\nupstream = \"http://x\"\n");
    assert_eq!(e.key(), Some("cache.max_bytes"), "{e}");
    let text = "listen = \"127.0.0.1:8080\"\n[cache]\nmax_bytes = \"1MiB\"\nmax_object_bytes = \"2MiB\"\n[[route]]\nname = \"a\"\nupstream = \"http://x\"\n";
    let e = err(text);
    assert_eq!(e.key(), Some("cache.max_object_bytes"));
    assert_eq!(e.line(), Some(4));
}

#[test]
fn bad_upstream_urls_are_refused() {
    for bad in ["ftp://x", "not a url", "http://x/?q=1", "/just/a/path"] {
        let e = err(&MINIMAL.replace("http://127.0.0.1:9000", bad));
        assert_eq!(e.key(), Some("route[0].upstream"), "{bad}: {e}");
        assert_eq!(e.line(), Some(4));
    }
}

#[test]
fn duplicate_routes_are_unreachable() {
    let text = format!("{MINIMAL}path_prefix = \"/a\"\n[[route]]\nname = \"b\"\npath_prefix = \"/a\"\nupstream = \"http://x\"\n");
    let e = err(&text);
    assert_eq!(e.key(), Some("route[1]"));
    assert_eq!(e.line(), Some(6));
    assert!(e.to_string().contains("never be reached"), "{e}");
}

#[test]
fn same_prefix_on_different_hosts_is_fine() {
    let text = format!("{MINIMAL}host = \"a.example\"\n[[route]]\nname = \"b\"\nhost = \"b.example\"\nupstream = \"http://x\"\n");
    assert_eq!(Config::parse(&text, "t").unwrap().routes.len(), 2);
}

#[test]
fn bad_enum_and_status_are_refused() {
    let e = err(&format!("{MINIMAL}key = {{ query = \"shuffle\" }}\n"));
    assert_eq!(e.line(), Some(5), "{e}");
    assert!(e.to_string().contains("shuffle"), "{e}");
    let e = err(&format!("{MINIMAL}cacheable_statuses = [200, 99]\n"));
    assert_eq!(e.key(), Some("route[0].cacheable_statuses"));
}

#[test]
fn trusted_proxies_are_addresses_or_networks() {
    let c = Config::parse(
        &format!("trusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n{MINIMAL}"),
        "test.toml",
    )
    .unwrap();
    assert_eq!(c.trusted_proxies.len(), 2);
    assert!(c.trusted_proxies[0].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
    let e = err(&format!("trusted_proxies = [\"10.0.0.0/33\"]\n{MINIMAL}"));
    assert_eq!(e.key(), Some("trusted_proxies"));
    assert_eq!(e.line(), Some(1));
}

#[test]
fn encoded_slashes_are_refused_unless_kept() {
    let c = Config::parse(MINIMAL, "test.toml").unwrap();
    assert_eq!(c.routes[0].encoded_slashes, EncodedSlashes::Reject);
    let c = Config::parse(&format!("{MINIMAL}encoded_slashes = \"keep\"\n"), "t").unwrap();
    assert_eq!(c.routes[0].encoded_slashes, EncodedSlashes::Keep);
}

#[test]
fn redis_section_turns_fleet_mode_on() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    assert!(c.redis.is_none());
    let text =
        format!("[redis]\nurl = \"redis://127.0.0.1:6379\"\n[lock]\nttl = \"3s\"\n{MINIMAL}")
            .replacen(MINIMAL.lines().next().unwrap(), "", 1);
    let text = format!("listen = \"127.0.0.1:8080\"\n{text}");
    let c = Config::parse(&text, "t").unwrap();
    let r = c.redis.unwrap();
    assert_eq!(
        (r.url.as_str(), r.key_prefix.as_str()),
        ("redis://127.0.0.1:6379", "corral:")
    );
    assert_eq!(c.lock.ttl, Duration::from_secs(3));
    assert_eq!(c.lock.mode, LockMode::Single);
}

#[test]
fn redlock_needs_an_odd_number_of_nodes_and_a_cache() {
    let head = "listen = \"127.0.0.1:8080\"\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n[lock]\nmode = \"redlock\"\n";
    let route = &MINIMAL[MINIMAL.find('[').unwrap()..];
    let nodes = |n: usize| {
        let list: Vec<String> = (0..n)
            .map(|i| format!("\"redis://127.0.0.1:{}\"", 7001 + i))
            .collect();
        format!("{head}nodes = [{}]\n{route}", list.join(", "))
    };
    assert_eq!(Config::parse(&nodes(5), "t").unwrap().lock.nodes.len(), 5);
    for n in [0, 1, 2, 4] {
        let e = err(&nodes(n));
        assert_eq!(e.key(), Some("lock.nodes"), "{n} nodes: {e}");
    }
    let e = err(&nodes(3).replace("[redis]\nurl = \"redis://127.0.0.1:6379\"\n", ""));
    assert_eq!(e.key(), Some("lock.mode"), "{e}");
    let e = err(&nodes(3).replace("mode = \"redlock\"", "mode = \"single\""));
    assert_eq!(e.key(), Some("lock.nodes"), "{e}");
}

#[test]
fn bad_redis_url_is_refused() {
    let e = err(&format!(
        "listen = \"127.0.0.1:8080\"\n[redis]\nurl = \"http://nope\"\n{}",
        &MINIMAL[MINIMAL.find('[').unwrap()..]
    ));
    assert_eq!(e.key(), Some("redis.url"), "{e}");
    assert_eq!(e.line(), Some(3));
}

/// A config whose `[redis]` section is `redis` (lines).
fn with_redis(redis: &str) -> String {
    format!(
        "listen = \"127.0.0.1:8080\"\n[redis]\n{redis}\n{}",
        &MINIMAL[MINIMAL.find('[').unwrap()..]
    )
}

#[test]
fn a_cluster_is_given_by_its_seed_nodes() {
    let c = Config::parse(
        &with_redis("cluster = [\"redis://10.0.0.1:6379\", \" redis://10.0.0.2:6379 \"]"),
        "t",
    )
    .unwrap();
    let r = c.redis.unwrap();
    assert!(r.is_cluster());
    assert_eq!(
        r.cluster,
        ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]
    );
    assert_eq!(r.url, "");
    assert_eq!(r.key_prefix, "corral:");
}

#[test]
fn a_cluster_and_a_url_together_or_neither_are_refused() {
    let both = with_redis("url = \"redis://a:1\"\ncluster = [\"redis://b:2\"]");
    let e = err(&both);
    assert_eq!(e.key(), Some("redis.cluster"), "{e}");
    assert!(e.to_string().contains("not both"), "{e}");
    let e = err(&with_redis("key_prefix = \"x:\""));
    assert_eq!((e.key(), e.line()), (Some("redis"), Some(2)), "{e}");
}

#[test]
fn bad_cluster_seeds_are_refused_without_their_passwords() {
    for (seeds, says) in [
        ("[]", "no seed"),
        ("[\"http://a:1\"]", "seed 1"),
        ("[\"redis://a:1\", \"nope\"]", "seed 2"),
        ("[\"redis://a:1/2\"]", "database 2"),
        ("[\"redis://a:1\", \"rediss://b:2\"]", "TLS or credentials"),
        (
            "[\"redis://:secret1@a:1\", \"redis://:secret2@b:2\"]",
            "TLS or credentials",
        ),
    ] {
        let e = err(&with_redis(&format!("cluster = {seeds}")));
        assert_eq!(e.key(), Some("redis.cluster"), "{seeds}: {e}");
        assert!(e.to_string().contains(says), "{seeds}: {e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn env(token: &str) -> Environment {
    Environment {
        admin_token: Some(token.into()),
    }
}

#[test]
fn public_admin_listen_needs_a_token() {
    let public = format!("admin_listen = \"0.0.0.0:9090\"\n{MINIMAL}");
    let e = err(&public);
    assert_eq!((e.key(), e.line()), (Some("admin_listen"), Some(1)), "{e}");
    assert!(e.to_string().starts_with("test.toml:1:"), "{e}");
    assert!(e.to_string().contains(ADMIN_TOKEN_ENV), "{e}");
    for addr in ["[::]:9090", "10.0.0.1:9090", "[::ffff:10.0.0.1]:9090"] {
        let e = err(&format!("admin_listen = \"{addr}\"\n{MINIMAL}"));
        assert_eq!(e.key(), Some("admin_listen"), "{addr}: {e}");
    }
    for addr in [
        "127.0.0.1:9090",
        "127.1.2.3:0",
        "[::1]:9090",
        "[::ffff:127.0.0.1]:1",
    ] {
        Config::parse(&format!("admin_listen = \"{addr}\"\n{MINIMAL}"), "t")
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
    }
    let with_file = format!("admin_token = \"{TOKEN}\"\n{public}");
    let c = Config::parse(&with_file, "t").unwrap();
    assert_eq!(c.admin_token.unwrap().source, TokenSource::File);
    let c = Config::parse_with(&public, "t", &env(TOKEN)).unwrap();
    let token = c.admin_token.unwrap();
    assert_eq!(token.source, TokenSource::Environment);
    assert!(token.matches(TOKEN.as_bytes()));
}

#[test]
fn the_environment_token_wins_and_is_checked() {
    let text = format!("admin_token = \"{TOKEN}\"\n{MINIMAL}");
    let other = "fedcba9876543210fedcba9876543210";
    let token = Config::parse_with(&text, "t", &env(other))
        .unwrap()
        .admin_token
        .unwrap();
    assert!(token.matches(other.as_bytes()) && !token.matches(TOKEN.as_bytes()));
    let e = Config::parse_with(&text, "t", &env("short")).unwrap_err();
    assert_eq!(e.key(), Some(ADMIN_TOKEN_ENV), "{e}");
    assert!(!e.to_string().contains("short"), "never echo a token: {e}");
}

#[test]
fn bad_file_tokens_are_refused_without_being_echoed() {
    for bad in ["tooshort", "has a space in it, sixteen+", ""] {
        let e = err(&format!("admin_token = \"{bad}\"\n{MINIMAL}"));
        assert_eq!((e.key(), e.line()), (Some("admin_token"), Some(1)), "{e}");
        assert!(bad.is_empty() || !e.to_string().contains(bad), "{e}");
    }
    let c = Config::parse(&format!("admin_token = \"{TOKEN}\"\n{MINIMAL}"), "t").unwrap();
    assert!(!format!("{c:?}").contains(TOKEN), "Debug hides the token");
}

#[test]
fn max_tags_defaults_to_64_and_is_bounded() {
    assert_eq!(Config::parse(MINIMAL, "t").unwrap().routes[0].max_tags, 64);
    let c = Config::parse(&format!("{MINIMAL}max_tags = 8\n"), "t").unwrap();
    assert_eq!(c.routes[0].max_tags, 8);
    for bad in ["0", "5000", "-1"] {
        let e = err(&format!("{MINIMAL}max_tags = {bad}\n"));
        assert_eq!(
            (e.key(), e.line()),
            (Some("route[0].max_tags"), Some(5)),
            "{e}"
        );
    }
}

#[test]
fn absurd_durations_are_refused_with_their_key() {
    for bad in ["11years", "100000000000000h", "18446744073709551615s"] {
        let e = err(&format!("{MINIMAL}ttl = \"{bad}\"\n"));
        assert_eq!(e.key(), Some("route[0].ttl"), "{bad}: {e}");
        assert_eq!(e.line(), Some(5), "{bad}: {e}");
    }
    let ok = Config::parse(&format!("{MINIMAL}ttl = \"9years\"\n"), "t").unwrap();
    assert!(ok.routes[0].ttl > Duration::from_secs(9 * 365 * 86400));
    let route = &MINIMAL[MINIMAL.find('[').unwrap()..];
    let e = err(&format!(
        "listen = \"127.0.0.1:8080\"\n[lock]\nttl = \"20years\"\n{route}"
    ));
    assert_eq!(e.key(), Some("lock.ttl"), "{e}");
}

#[test]
fn upstream_credentials_are_refused_without_printing_them() {
    for url in [
        "http://user:s3cret@127.0.0.1:9000",
        "https://:s3cret@x/base",
        "ftp://user:s3cret@x",
    ] {
        let e = err(&MINIMAL.replace("http://127.0.0.1:9000", url));
        assert_eq!(e.key(), Some("route[0].upstream"), "{url}: {e}");
        assert!(!e.to_string().contains("s3cret"), "{url}: {e}");
    }
    let e = err(&MINIMAL.replace("http://127.0.0.1:9000", "http://user:s3cret@x"));
    assert!(e.to_string().contains("credentials"), "{e}");
    assert_eq!(without_userinfo("http://u:p@h:1/a@b"), "http://***@h:1/a@b");
}

#[test]
fn route_hosts_are_normalised_or_refused() {
    let host = |h: &str| {
        Config::parse(&format!("{MINIMAL}host = \"{h}\"\n"), "t").map(|c| c.routes[0].host.clone())
    };
    assert_eq!(
        host("Example.COM.").unwrap().as_deref(),
        Some("example.com")
    );
    assert_eq!(
        host("a_b-1.example").unwrap().as_deref(),
        Some("a_b-1.example")
    );
    for bad in [
        "",
        ".",
        "a..b",
        "x.com:80",
        "x.com/p",
        "http://x.com",
        "a b",
        "x.com..",
        "[::1]",
        "é.com",
    ] {
        let e = host(bad).expect_err(bad);
        assert_eq!(e.key(), Some("route[0].host"), "{bad:?}: {e}");
    }
}

#[test]
fn cookie_settings_are_cookie_names() {
    let c = Config::parse(
        &format!(
            "{MINIMAL}key = {{ cookies = [\"lang\"] }}\nignore_cookies = [\"_ga\", \"_gid\"]\n"
        ),
        "t",
    )
    .unwrap();
    assert_eq!(c.routes[0].key_cookies, ["lang"]);
    assert_eq!(c.routes[0].ignore_cookies, ["_ga", "_gid"]);
    let e = err(&format!("{MINIMAL}ignore_cookies = [\"a=b\"]\n"));
    assert_eq!(e.key(), Some("route[0].ignore_cookies"), "{e}");
    let e = err(&format!("{MINIMAL}key = {{ cookies = [\"\"] }}\n"));
    assert_eq!(e.key(), Some("route[0].key.cookies"), "{e}");
}

#[test]
fn default_statuses_leave_method_errors_out_and_206_is_refused() {
    let c = Config::parse(MINIMAL, "t").unwrap();
    let codes: Vec<u16> = c.routes[0]
        .cacheable_statuses
        .iter()
        .map(|s| s.as_u16())
        .collect();
    assert!(!codes.contains(&405) && !codes.contains(&501), "{codes:?}");
    let e = err(&format!("{MINIMAL}cacheable_statuses = [200, 206]\n"));
    assert_eq!(e.key(), Some("route[0].cacheable_statuses"), "{e}");
}

#[test]
fn no_routes_is_refused() {
    assert_eq!(err("listen = \"127.0.0.1:8080\"\n").key(), Some("route"));
}

#[test]
fn early_refresh_is_on_with_beta_1_and_turns_off_either_way() {
    let beta = |extra: &str| {
        Config::parse(&format!("{MINIMAL}{extra}"), "t")
            .unwrap()
            .routes[0]
            .early_refresh_beta
    };
    assert_eq!(beta(""), 1.0);
    assert_eq!(beta("early_refresh_beta = 2.5\n"), 2.5);
    assert_eq!(beta("early_refresh_beta = 0.0\n"), 0.0);
    assert_eq!(
        beta("early_refresh = false\nearly_refresh_beta = 2.0\n"),
        0.0
    );
    for bad in ["-1.0", "11.0", "nan", "inf"] {
        let e = err(&format!("{MINIMAL}early_refresh_beta = {bad}\n"));
        assert_eq!(e.key(), Some("route[0].early_refresh_beta"), "{bad}: {e}");
    }
}

#[test]
fn upstream_caps_are_off_unless_a_concurrency_is_set() {
    let caps = |extra: &str| {
        Config::parse(&format!("{MINIMAL}{extra}"), "t")
            .unwrap()
            .routes[0]
            .upstream_caps
    };
    assert_eq!(caps(""), None);
    let instance = caps("upstream_concurrency = 8\n").unwrap();
    assert_eq!(
        (instance.instance, instance.fleet, instance.queue),
        (8, None, 1024)
    );
    assert_eq!(instance.queue_timeout, Duration::from_secs(10));
    // The fleet's cap alone: an instance may use all of it.
    let fleet = caps(
        "fleet_upstream_concurrency = 30\nupstream_queue = 0\nupstream_queue_timeout = \"2s\"\n",
    )
    .unwrap();
    assert_eq!(
        (fleet.instance, fleet.fleet, fleet.queue),
        (30, Some(30), 0)
    );
    assert_eq!(fleet.queue_timeout, Duration::from_secs(2));
    for (bad, key) in [
        ("upstream_concurrency = 0", "upstream_concurrency"),
        (
            "fleet_upstream_concurrency = 100001",
            "fleet_upstream_concurrency",
        ),
        (
            "upstream_concurrency = 4\nupstream_queue_timeout = \"0s\"",
            "upstream_queue_timeout",
        ),
        ("upstream_queue = 10", "upstream_queue"),
    ] {
        let e = err(&format!("{MINIMAL}{bad}\n"));
        assert_eq!(
            e.key(),
            Some(format!("route[0].{key}").as_str()),
            "{bad}: {e}"
        );
    }
}

#[test]
fn access_log_is_off_unless_set_and_its_format_needs_it() {
    let log = |top: &str| {
        Config::parse(&format!("{top}{}", &MINIMAL), "t")
            .unwrap()
            .access_log
    };
    assert_eq!(log(""), None);
    let stdout = log("access_log = \"stdout\"\n").unwrap();
    assert_eq!(
        (stdout.path, stdout.format),
        (None, AccessLogFormat::Combined)
    );
    let file = log("access_log = \"/var/log/corral.log\"\naccess_log_format = \"json\"\n").unwrap();
    assert_eq!(
        file.path.as_deref(),
        Some(std::path::Path::new("/var/log/corral.log"))
    );
    assert_eq!(file.format, AccessLogFormat::Json);
    for (bad, key) in [
        ("access_log_format = \"json\"\n", "access_log_format"),
        ("access_log = \"\"\n", "access_log"),
        (
            "access_log = \"stdout\"\naccess_log_format = \"xml\"\n",
            "access_log_format",
        ),
    ] {
        let e = err(&format!("{bad}{MINIMAL}"));
        assert_eq!(e.key(), Some(key), "{bad}: {e}");
    }
}
