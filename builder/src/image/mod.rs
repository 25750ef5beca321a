//! `amictl image`: from a raw NixOS disk image to a registered, content-addressed AMI.

pub mod aws;
pub mod aws_lifecycle;
pub mod blocks;
pub mod buffers;
pub mod cache;
pub mod digest;
pub mod error;
pub mod gc;
pub mod info;
pub mod lifecycle;
pub mod plan;
pub mod publish;
pub mod register;
pub mod s3;
pub mod s3_aws;
pub mod upload;
