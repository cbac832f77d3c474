//! The Kubernetes CSI driver's node side (issue 21): the node plugin's gRPC services
//! (`grpc.rs`) over its work (`node.rs`: a publish is `volume.rs`'s plan, a kernel mount and
//! a hand-over), the mounter that serves FUSE connections without privilege (`mounter.rs`)
//! and holds them for a crashed child's successor (`holder.rs`),
//! their protocol (`wire.rs`, over `seqpacket.rs`) and the secrets' memfd (`secrets.rs`).

pub mod grpc;
pub mod holder;
pub mod mounter;
pub mod node;
pub mod secrets;
pub mod seqpacket;
pub mod volume;
pub mod wire;
