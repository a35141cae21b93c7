//! The edge end to end: the real binary, real upstream servers on port 0, curl and a
//! WebSocket client as the users' clients.

mod acme;
mod acme_issuers;
mod bad_input;
mod basic_auth;
mod chain;
mod cli;
mod client_ip;
mod corpus;
mod coverage;
mod differential;
mod dns01;
mod dynamic_upstreams;
mod forward_auth;
mod globals;
mod h3;
mod limits;
mod metrics;
mod on_demand;
mod paths;
mod php;
mod rate_limit;
mod s3_storage;
mod same_as_caddy;
mod server_timeouts;
mod serving;
mod support;
mod tls;
mod transport_options;
mod upstreams;
