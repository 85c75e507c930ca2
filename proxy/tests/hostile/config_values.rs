//! The config loader against arbitrary input (property tests): whatever the text, and
//! whatever the value of a duration, size, URL or host setting, it never panics, and
//! a refusal names the file and the line to fix.

use corral::config::Config;
use proptest::prelude::*;

const ROUTE: &str = "[[route]]\nname = \"api\"\nupstream = \"http://127.0.0.1:9000\"\n";

/// Route keys whose values are parsed beyond TOML: durations, hosts, URLs, lists.
const ROUTE_KEYS: &[&str] = &[
    "ttl",
    "stale_while_revalidate",
    "stale_if_error",
    "keep",
    "hit_for_pass",
    "wait_timeout",
    "connect_timeout",
    "response_timeout",
    "host",
    "path_prefix",
    "cacheable_statuses",
    "ignore_cookies",
    "tag_header",
    "key",
];

/// Keys of the other sections, as `section`, `key`.
const SECTION_KEYS: &[(&str, &str)] = &[
    ("cache", "max_bytes"),
    ("cache", "max_object_bytes"),
    ("lock", "ttl"),
    ("lock", "wait_timeout"),
    ("lock", "node_timeout"),
    ("lock", "retry_delay"),
    ("redis", "url"),
    ("redis", "local_ttl"),
    ("redis", "command_timeout"),
];

/// A TOML value of any shape, with strings that look like durations, sizes, URLs and
/// hosts (absurd ones included) as well as arbitrary text.
fn value() -> impl Strategy<Value = String> {
    let text = prop_oneof![
        "[0-9]{1,30}(ns|ms|s|m|h|d|w|y|years|MiB|GiB|EiB|B|)",
        "-?[0-9]{1,5}(\\.[0-9]{1,3})?[a-z]{0,5}",
        "(http|https|ftp|redis)://([a-z:]{0,8}@)?[a-zA-Z0-9.:\\[\\]-]{0,20}(/[a-z@%.]{0,8})?",
        "[a-zA-Z0-9._:/ -]{0,20}\\.?",
        "\\PC{0,24}",
    ]
    .prop_map(|s| toml::Value::String(s).to_string());
    let scalar = prop_oneof![
        text,
        any::<i64>().prop_map(|i| i.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<f64>().prop_map(|f| toml::Value::Float(f).to_string()),
    ];
    prop_oneof![
        3 => scalar.clone(),
        1 => prop::collection::vec(scalar.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => prop::collection::vec(scalar, 0..3)
            .prop_map(|v| format!("{{ query = \"keep\", cookies = [{}] }}", v.join(", "))),
    ]
}

/// The line (1-based) an error must name, or any line when `None`.
fn check(text: &str, line: Option<usize>) -> Result<(), TestCaseError> {
    if let Err(e) = Config::parse(text, "fuzz.toml") {
        let message = e.to_string();
        prop_assert!(message.starts_with("fuzz.toml:"), "{message}");
        let named = e.line();
        prop_assert!(named.is_some(), "{message}");
        let lines = text.lines().count().max(1);
        prop_assert!(named.is_some_and(|n| n >= 1 && n <= lines + 1), "{message}");
        if let Some(line) = line {
            prop_assert_eq!(named, Some(line), "{}\n{}", message, text);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        check(&text, None)?;
    }

    #[test]
    fn toml_ish_lines_never_panic(
        lines in prop::collection::vec(
            prop_oneof![
                "\\[\\[route\\]\\]".prop_map(String::from),
                "\\[(cache|lock|redis|route|x)\\]".prop_map(String::from),
                ("[a-z_.]{1,16}", value()).prop_map(|(k, v)| format!("{k} = {v}")),
                "\\PC{0,30}",
            ],
            0..12,
        )
    ) {
        let text = format!("listen = \"127.0.0.1:8080\"\n{}\n", lines.join("\n"));
        check(&text, None)?;
    }

    #[test]
    fn any_value_of_a_route_setting_is_accepted_or_refused_on_its_line(
        key in prop::sample::select(ROUTE_KEYS),
        value in value(),
    ) {
        let text = format!("listen = \"127.0.0.1:8080\"\n{ROUTE}{key} = {value}\n");
        check(&text, Some(5))?;
    }

    #[test]
    fn any_upstream_url_is_accepted_or_refused_without_its_password(
        url in "(http|https|ftp)://([a-z]{1,5}:s3cret@)?[a-zA-Z0-9.:\\[\\]-]{0,20}(/[a-z@%.?]{0,8})?",
    ) {
        let text = ROUTE.replace("http://127.0.0.1:9000", &url);
        let text = format!("listen = \"127.0.0.1:8080\"\n{text}");
        check(&text, Some(4))?;
        if let Err(e) = Config::parse(&text, "fuzz.toml") {
            prop_assert!(!e.to_string().contains("s3cret"), "{}", e);
        }
    }

    #[test]
    fn any_value_of_a_section_setting_is_accepted_or_refused_on_its_line(
        (section, key) in prop::sample::select(SECTION_KEYS),
        value in value(),
    ) {
        // The redis section needs its url; any other key of it goes after.
        let redis = if section == "redis" && key != "url" { "url = \"redis://127.0.0.1:6379\"\n" } else { "" };
        let text = format!("listen = \"127.0.0.1:8080\"\n[{section}]\n{redis}{key} = {value}\n{ROUTE}");
        let line = if redis.is_empty() { 3 } else { 4 };
        check(&text, Some(line))?;
    }
}
