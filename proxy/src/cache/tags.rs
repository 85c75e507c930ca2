//! Purge tags: which tags a stored response carries, per its route's `tag_header`,
//! bounded so that no response can make corral do unbounded work per fill.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::HeaderName;
use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;

use super::entry::CacheEntry;
use crate::config::RouteConfig;
use crate::metrics::Metrics;

/// A tag longer than this is dropped (not truncated: two long tags cut to the same
/// prefix would purge each other's entries). Fastly's limit for a surrogate key.
pub(crate) const MAX_TAG_LEN: usize = 1024;

/// The tags a response carries in `header` (space- or comma-separated, as
/// `Surrogate-Key` and `Cache-Tag` write them), unbounded: see [`TagRules::tags_of`].
pub fn tags<'h>(headers: &'h HeaderMap, header: &HeaderName) -> impl Iterator<Item = &'h str> {
    split_tags(headers.get_all(header).iter().map(|v| v.as_bytes()))
}

/// The tags in the values of a tag header.
fn split_tags<'h>(values: impl Iterator<Item = &'h [u8]>) -> impl Iterator<Item = &'h str> {
    values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split([' ', ',']))
        .filter(|t| !t.is_empty())
}

/// One route's tag settings, and how many tags it has had to drop.
struct TagRule {
    /// The route's name, for the log.
    route: String,
    header: HeaderName,
    max_tags: usize,
    /// Set by the first response whose tags were cut, which logs it: a misbehaving
    /// origin says so once, not on every fill.
    warned: AtomicBool,
    /// `corral_tags_dropped_total{route}`.
    dropped: Counter,
}

/// The tag settings of every route that has a `tag_header`, by the route's cache scope
/// (`RouteConfig::cache_scope`, which the keys start with). Cheap to clone.
///
/// Rules are only ever added (by a reload, [`TagRules::add_routes`]), never replaced or
/// removed: a scope's settings never change (a change makes a new scope), so the tags
/// an entry is indexed under when stored are the ones found again when it leaves, even
/// when it leaves after a reload removed its route.
#[derive(Clone, Default)]
pub struct TagRules {
    by_scope: Arc<ArcSwap<HashMap<String, Arc<TagRule>>>>,
}

impl TagRules {
    pub(crate) fn from_routes(routes: &[RouteConfig], metrics: &Metrics) -> TagRules {
        let rules = TagRules::default();
        rules.add_routes(routes, metrics);
        rules
    }

    /// Adds the rules of `routes` whose scopes are new.
    pub(crate) fn add_routes(&self, routes: &[RouteConfig], metrics: &Metrics) {
        let new: Vec<(String, Arc<TagRule>)> = routes
            .iter()
            .filter(|r| !self.by_scope.load().contains_key(r.cache_scope()))
            .filter_map(|r| {
                let rule = TagRule {
                    route: r.name.clone(),
                    header: r.tag_header.clone()?,
                    max_tags: r.max_tags,
                    warned: AtomicBool::new(false),
                    dropped: metrics.tags_dropped(&r.name),
                };
                Some((r.cache_scope().to_string(), Arc::new(rule)))
            })
            .collect();
        if new.is_empty() {
            return;
        }
        // Only a reload writes, one at a time; `rcu` retries if another raced it.
        self.by_scope.rcu(|rules| {
            let mut rules = HashMap::clone(rules);
            for (scope, rule) in &new {
                rules
                    .entry(scope.clone())
                    .or_insert_with(|| Arc::clone(rule));
            }
            rules
        });
    }

    /// Whether no route has tags (then nothing needs indexing).
    pub(crate) fn is_empty(&self) -> bool {
        self.by_scope.load().is_empty()
    }

    fn rule(&self, scope: &str) -> Option<Arc<TagRule>> {
        self.by_scope.load().get(scope).cloned()
    }

    /// The distinct tags of a response stored under `scope` (a key's
    /// [`CacheKey::scope`](super::CacheKey::scope)): the first `max_tags` of at most
    /// [`MAX_TAG_LEN`] bytes.
    pub(crate) fn tags_of<'h>(&self, scope: &str, entry: &'h CacheEntry) -> Vec<&'h str> {
        self.select(self.rule(scope).as_deref(), entry).0
    }

    /// [`TagRules::tags_of`] for a response being stored: the tags dropped are counted,
    /// and the first time for a route, logged.
    pub(crate) fn tags_to_store<'h>(&self, scope: &str, entry: &'h CacheEntry) -> Vec<&'h str> {
        let rule = self.rule(scope);
        let (kept, dropped) = self.select(rule.as_deref(), entry);
        if let (Some(rule), true) = (rule, dropped > 0) {
            rule.dropped.inc_by(dropped);
            if !rule.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    route = rule.route,
                    max_tags = rule.max_tags,
                    max_tag_len = MAX_TAG_LEN,
                    dropped,
                    "a response carried more (or longer) purge tags than allowed; the rest are dropped (logged once per route)"
                );
            }
        }
        kept
    }

    /// The tags kept, and how many were dropped.
    fn select<'h>(&self, rule: Option<&TagRule>, entry: &'h CacheEntry) -> (Vec<&'h str>, u64) {
        let Some(rule) = rule else {
            return (Vec::new(), 0);
        };
        let mut kept = Vec::new();
        let mut seen = HashSet::new();
        let mut dropped = 0u64;
        for tag in split_tags(entry.header_values(&rule.header)) {
            if !seen.insert(tag) {
                continue;
            }
            if tag.len() > MAX_TAG_LEN || kept.len() >= rule.max_tags {
                dropped += 1;
            } else {
                kept.push(tag);
            }
        }
        (kept, dropped)
    }
}

#[cfg(test)]
impl TagRules {
    /// How many tags the responses stored under `scope` have had dropped so far.
    fn dropped(&self, scope: &str) -> u64 {
        self.rule(scope).map_or(0, |r| r.dropped.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_route;

    /// The test route's rules, its tags in `Surrogate-Key`, keeping `max_tags` of them
    /// (`None`: the default).
    fn rules(max_tags: Option<usize>) -> (TagRules, String) {
        let mut route = test_route();
        route.tag_header = Some(HeaderName::from_static("surrogate-key"));
        route.max_tags = max_tags.unwrap_or(route.max_tags);
        let rules = TagRules::from_routes(std::slice::from_ref(&route), &Metrics::new());
        (rules, route.cache_scope().to_string())
    }

    /// An entry whose response carried `Surrogate-Key: value`.
    fn headers(value: &str) -> CacheEntry {
        let (req, ()) = http::Request::new(()).into_parts();
        let (mut res, ()) = http::Response::new(()).into_parts();
        res.headers.insert("surrogate-key", value.parse().unwrap());
        let lifetime =
            crate::cache::policy::Lifetime::none(&req, &res, std::time::SystemTime::now());
        CacheEntry::new(res, bytes::Bytes::new(), lifetime, &HeaderMap::new()).unwrap()
    }

    #[test]
    fn tags_are_bounded_deduplicated_and_counted() {
        let (rules, r) = rules(Some(3));
        let long = "x".repeat(MAX_TAG_LEN + 1);
        let h = headers(&format!("a b,a c {long} d e"));
        assert_eq!(rules.tags_to_store(&r, &h), ["a", "b", "c"]);
        assert_eq!(rules.dropped(&r), 3, "the long tag, d and e");
        assert!(rules.tags_to_store("other-route", &h).is_empty());
        assert_eq!(rules.tags_of(&r, &h).len(), 3);
        assert_eq!(rules.dropped(&r), 3, "only stores count");
    }

    #[test]
    fn default_bound_is_64() {
        let (rules, r) = rules(None);
        let many: Vec<String> = (0..5000).map(|i| format!("t{i}")).collect();
        let h = headers(&many.join(" "));
        assert_eq!(rules.tags_to_store(&r, &h).len(), 64);
        assert_eq!(rules.dropped(&r), 5000 - 64);
    }
}
