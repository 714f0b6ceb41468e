//! Integration tests: one binary (one link step), a module per area.

mod extract;
mod lifecycle;
mod reconcile;
mod restart;
mod scenarios;
mod schemas;
mod support;
mod webhook;
