//! quill's integration tests: one binary, a real PostgreSQL, a fresh database per test.

mod support;

mod auth;
mod change_feed;
mod channels;
mod cluster;
mod db_tls;
mod events;
mod external_tokens;
mod feathers;
mod js_client;
mod limits;
mod model;
mod openapi;
mod properties;
mod reader;
mod recovery;
mod replica;
mod rest_crud;
mod rest_query;
mod resume;
mod retention;
mod schema;
mod scope;
mod security;
mod slow_consumers;
mod startup;
mod store_pool;
mod supabase;
mod truncate;
mod ws_protocol;
