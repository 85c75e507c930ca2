//! HTTP pieces every layer shares and none owns: the one body type, header rules
//! (hop-by-hop, forwarding, `Via`), what a client request becomes once admitted, and
//! the `Cache-Status` header. Depends on nothing else in corral.

pub(crate) mod body;
pub mod cache_status;
pub(crate) mod headers;
pub mod request;
