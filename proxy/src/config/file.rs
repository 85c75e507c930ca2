//! The file as written: serde types that keep each value's span and refuse unknown keys.

use serde::Deserialize;
use toml::Spanned;

use super::limits::FileLimits;
use super::settings::{EncodedSlashes, LockMode, OnWaitTimeout, QueryMode};

pub(super) type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Text,
    pub(super) admin_listen: Option<Text>,
    pub(super) admin_token: Option<Text>,
    pub(super) shutdown_grace: Option<Text>,
    pub(super) workers: Option<Spanned<u32>>,
    pub(super) trusted_proxies: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) cache: FileCache,
    #[serde(default)]
    pub(super) lock: FileLock,
    pub(super) redis: Option<FileRedis>,
    #[serde(default)]
    pub(super) limits: FileLimits,
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
    pub(super) url: Text,
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
    #[serde(default)]
    pub(super) override_ttl: bool,
    pub(super) stale_while_revalidate: Option<Text>,
    pub(super) stale_if_error: Option<Text>,
    pub(super) keep: Option<Text>,
    #[serde(default)]
    pub(super) key: FileKey,
    #[serde(default)]
    pub(super) ignore_cookies: Vec<Text>,
    pub(super) cacheable_statuses: Option<Spanned<Vec<u16>>>,
    #[serde(default = "yes")]
    pub(super) cache: bool,
    #[serde(default = "yes")]
    pub(super) coalesce: bool,
    #[serde(default)]
    pub(super) allow_authorization: bool,
    #[serde(default)]
    pub(super) allow_set_cookie: bool,
    #[serde(default)]
    pub(super) allow_private: bool,
    pub(super) hit_for_pass: Option<Text>,
    #[serde(default)]
    pub(super) preserve_host: bool,
    pub(super) tag_header: Option<Text>,
    pub(super) max_tags: Option<Spanned<u32>>,
    pub(super) wait_timeout: Option<Text>,
    pub(super) on_wait_timeout: Option<OnWaitTimeout>,
    pub(super) encoded_slashes: Option<EncodedSlashes>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileKey {
    #[serde(default = "keep")]
    pub(super) query: QueryMode,
    #[serde(default)]
    pub(super) headers: Vec<Text>,
    #[serde(default)]
    pub(super) cookies: Vec<Text>,
}

fn keep() -> QueryMode {
    QueryMode::Keep
}

impl Default for FileKey {
    fn default() -> Self {
        FileKey {
            query: QueryMode::Keep,
            headers: Vec::new(),
            cookies: Vec::new(),
        }
    }
}
