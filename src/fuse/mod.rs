//! The `fuser` adapter and the mount session: the only code that knows about the kernel.

pub mod adapter;
pub mod control;
pub mod handover;
pub mod kernel_mount;
pub mod session;
