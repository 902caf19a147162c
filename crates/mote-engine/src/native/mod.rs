//! mote's own backends and kernels: where the engine must lead on speed and determinism.

pub mod bert;
pub mod gemm;
pub mod int8;
pub mod kernels;
pub mod vector;
