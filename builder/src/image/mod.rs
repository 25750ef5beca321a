//! `amictl image`: from a raw NixOS disk image to a registered, content-addressed AMI.

pub mod aws;
pub mod cache;
pub mod digest;
pub mod info;
pub mod plan;
pub mod publish;
pub mod register;
pub mod upload;
