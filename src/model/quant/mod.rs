//! Hand-written CPU matmul kernels for weight types whose candle kernels are scalar.

pub mod q4_1;
