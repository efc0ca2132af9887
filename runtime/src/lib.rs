//! `dragon-runtime`: the layer that knows processes and nodes.
//!
//! So far: [`spawn`], the process-launch module (fork/exec with a Policy's CPU affinity,
//! cwd, environment, standard streams and process group applied between fork and exec).
//! The launcher, node agent and global services build on it.

#![warn(missing_docs)]

pub mod spawn;
