// The cache types, one line each: the variant, the name `-ctk`/`-ctv` take, the codec that
// stores its rows, and the GPU kernels that read them:
//   [kernels N]  its own, codec id N in the kernels (`C_<NAME>` in the generated
//                codec_ids.cuh; kernels/cuda/decode.cu is built once per such type);
//   [like T]     T's kernels, whose bytes it shares (RotorQuant's block rotations run on the
//                turbo kernels of their bit width, spectral3 on spectral4's tables);
//   [host]       none: its layers keep their cache in host memory.
// kv/mod.rs builds `CacheType` and its codecs from this file and build.rs the kernel list and
// codec_ids.cuh, so adding a cache type is its codec file, its kernel code and one line here
// (docs/ARCHITECTURE.md, "Adding a cache type").
cache_types! {
    F32 => "f32", codec::f32::F32Codec, [host];
    F16 => "f16", codec::f16::F16Codec, [kernels 0];
    Bf16 => "bf16", codec::f16::Bf16Codec, [host];
    Q8_0 => "q8_0", codec::q8_0::Q8_0Codec, [kernels 4];
    Q4_0 => "q4_0", codec::q4_0::Q4_0Codec, [kernels 5];
    Turbo4 => "turbo4", codec::turbo4::Turbo4Codec::default(), [kernels 1];
    Turbo3 => "turbo3", codec::turbo3::Turbo3Codec::default(), [kernels 2];
    Turbo2 => "turbo2", codec::turbo2::Turbo2Codec::default(), [kernels 3];
    Planar4 => "planar4", codec::planar::Planar4Codec::default(), [like Turbo4];
    Planar3 => "planar3", codec::planar::Planar3Codec::default(), [like Turbo3];
    Iso4 => "iso4", codec::iso::Iso4Codec::default(), [like Turbo4];
    Iso3 => "iso3", codec::iso::Iso3Codec::default(), [like Turbo3];
    Rotor4 => "rotor4", codec::rotor::Rotor4Codec::default(), [like Turbo4];
    Rotor3 => "rotor3", codec::rotor::Rotor3Codec::default(), [like Turbo3];
    Spectral4 => "spectral4", codec::spectral::Spectral4Codec::default(), [kernels 6];
    Spectral3 => "spectral3", codec::spectral::Spectral3Codec::default(), [like Spectral4];
}
