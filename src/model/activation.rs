//! The gated MLP's activation, shared by the layers and the fused GPU step.

#[derive(Clone, Copy)]
pub enum Activation {
    /// llama family
    Silu,
    /// gemma: GELU, tanh approximation
    GeluTanh,
}
