//! The Kubernetes CSI driver's node side (issue 21): the mounter that serves FUSE
//! connections without privilege (`mounter.rs`), its protocol with the node plugin
//! (`wire.rs`, over `seqpacket.rs`).

pub mod mounter;
pub mod secrets;
pub mod seqpacket;
pub mod wire;
