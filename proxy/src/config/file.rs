//! The file as written: serde types that keep each value's span and refuse unknown keys.
//! A key left out is `None` here; its default lives with the validated settings.

use serde::Deserialize;
use toml::Spanned;

use super::limits::FileLimits;
use super::settings::{AccessLogFormat, EncodedSlashes, LockMode, OnWaitTimeout, QueryMode};
use super::source::Text;
use super::tls::FileTls;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Text,
    pub(super) admin_listen: Option<Text>,
    pub(super) admin_token: Option<Text>,
    pub(super) shutdown_grace: Option<Text>,
    pub(super) workers: Option<Spanned<u32>>,
    pub(super) trusted_proxies: Option<Spanned<Vec<String>>>,
    pub(super) access_log: Option<Text>,
    pub(super) access_log_format: Option<Spanned<AccessLogFormat>>,
    #[serde(default)]
    pub(super) cache: FileCache,
    #[serde(default)]
    pub(super) lock: FileLock,
    pub(super) redis: Option<FileRedis>,
    #[serde(default)]
    pub(super) limits: FileLimits,
    pub(super) tls: Option<FileTls>,
    #[serde(default, rename = "route")]
    pub(super) routes: Vec<FileRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCache {
    pub(super) max_bytes: Option<Text>,
    pub(super) max_object_bytes: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLock {
    pub(super) wait_timeout: Option<Text>,
    pub(super) on_wait_timeout: Option<OnWaitTimeout>,
    pub(super) mode: Option<LockMode>,
    pub(super) ttl: Option<Text>,
    pub(super) nodes: Option<Spanned<Vec<String>>>,
    pub(super) node_timeout: Option<Text>,
    pub(super) retries: Option<u32>,
    pub(super) retry_delay: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRedis {
    pub(super) url: Option<Text>,
    pub(super) cluster: Option<Spanned<Vec<String>>>,
    pub(super) key_prefix: Option<Text>,
    pub(super) connect_timeout: Option<Text>,
    pub(super) command_timeout: Option<Text>,
    pub(super) retry_after: Option<Text>,
    pub(super) local_ttl: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    pub(super) name: Text,
    pub(super) host: Option<Text>,
    pub(super) path_prefix: Option<Text>,
    pub(super) upstream: Text,
    pub(super) connect_timeout: Option<Text>,
    pub(super) response_timeout: Option<Text>,
    pub(super) ttl: Option<Text>,
    pub(super) override_ttl: Option<bool>,
    pub(super) stale_while_revalidate: Option<Text>,
    pub(super) stale_if_error: Option<Text>,
    pub(super) keep: Option<Text>,
    #[serde(default)]
    pub(super) key: FileKey,
    #[serde(default)]
    pub(super) ignore_cookies: Vec<Text>,
    pub(super) cacheable_statuses: Option<Spanned<Vec<u16>>>,
    pub(super) cache: Option<bool>,
    pub(super) coalesce: Option<bool>,
    pub(super) early_refresh: Option<bool>,
    pub(super) early_refresh_beta: Option<Spanned<f64>>,
    pub(super) upstream_concurrency: Option<Spanned<u32>>,
    pub(super) fleet_upstream_concurrency: Option<Spanned<u32>>,
    pub(super) upstream_queue: Option<Spanned<u32>>,
    pub(super) upstream_queue_timeout: Option<Text>,
    pub(super) allow_authorization: Option<bool>,
    pub(super) allow_set_cookie: Option<bool>,
    pub(super) allow_private: Option<bool>,
    pub(super) hit_for_pass: Option<Text>,
    pub(super) preserve_host: Option<bool>,
    pub(super) tag_header: Option<Text>,
    pub(super) max_tags: Option<Spanned<u32>>,
    pub(super) wait_timeout: Option<Text>,
    pub(super) on_wait_timeout: Option<OnWaitTimeout>,
    pub(super) encoded_slashes: Option<EncodedSlashes>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileKey {
    pub(super) query: Option<QueryMode>,
    #[serde(default)]
    pub(super) headers: Vec<Text>,
    #[serde(default)]
    pub(super) cookies: Vec<Text>,
}
