//! Integration tests: one binary (one link step), a module per area.

mod browser;
mod check;
mod cli;
mod connections;
mod console;
mod crash;
mod details;
mod durability;
mod extract;
mod fuzz;
mod fuzz_campaign;
mod grants;
mod guarantees;
mod lifecycle;
mod members;
mod openapi;
mod ordering;
mod reconcile;
mod reload;
mod replay;
mod restart;
mod scenarios;
mod schemas;
mod store_faults;
mod support;
mod webhook;
