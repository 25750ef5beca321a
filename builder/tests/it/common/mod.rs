//! Shared fixtures for the builder's integration tests.
#![allow(dead_code)]

pub mod moto;
