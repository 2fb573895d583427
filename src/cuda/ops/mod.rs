//! The CUDA executor's kernels, ggml-cuda style: one file per family of ops — [`linear`],
//! [`norm`], [`rope`], [`attention`], [`mla`], [`moe`], [`conv`], [`gpt_oss`], [`sample`], [`gemm`] — each `.rs` beside its
//! `.cu`, primitive and fused kernels of an op side by side. Every kernel has a typed
//! launcher that owns its argument struct and its launch rule (grid and block).
//!
//! Why argument structs: a kernel takes one `#[repr(C)]` struct by value, declared once in
//! Rust with [`kernel_args!`], which also writes the C declaration compiled in front of the
//! kernels, with a `static_assert` on its size. A field added, dropped or retyped on one
//! side fails to compile on the other instead of giving wrong numbers (the old positional
//! lists of up to 24 scalars did the latter), and a launcher cannot pass a weight matrix
//! as anything but a [`QMat`]. Constants both sides need ([`ATTN_THREADS`], ...) are also
//! written into that prelude, from here.

pub mod attention;
pub mod conv;
pub mod gemm;
pub mod gpt_oss;
pub mod linear;
pub mod mla;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod sample;

use std::marker::PhantomData;

use super::Device;
use crate::error::Result;

/// Threads of an attention block (GQA and MLA).
pub const ATTN_THREADS: u32 = 128;
/// Largest GQA head dim the attention kernel holds in shared memory.
pub const MAX_HEAD_DIM: usize = 256;
/// Largest MLA latent width (`kv_lora_rank`) and rope width the MLA kernels hold.
pub const MLA_MAX_LATENT: usize = 512;
/// See [`MLA_MAX_LATENT`].
pub const MLA_MAX_ROPE: usize = 64;

/// The kernel sources of the built-in module after `common.cuh`, in dependency order
/// (MLA attention reuses attention's split merge; GPT-OSS's RoPE reuses MLA's `rope_slice`).
pub const SOURCES: [&str; 10] = [
    include_str!("linear.cu"),
    include_str!("norm.cu"),
    include_str!("rope.cu"),
    include_str!("attention.cu"),
    include_str!("mla.cu"),
    include_str!("moe.cu"),
    include_str!("gpt_oss.cu"),
    include_str!("sample.cu"),
    include_str!("conv.cu"),
    include_str!("gemm.cu"),
];

/// A type a kernel-argument field can have, with its C spelling.
pub trait CType {
    /// The C type, e.g. `const bf16*`.
    fn c_type() -> String;
}

impl CType for i32 {
    fn c_type() -> String {
        "int".into()
    }
}

impl CType for i64 {
    fn c_type() -> String {
        "long".into()
    }
}

impl CType for f32 {
    fn c_type() -> String {
        "float".into()
    }
}

impl CType for u64 {
    fn c_type() -> String {
        "unsigned long long".into()
    }
}

/// What a device pointer points at (marker types: `bf16`, `float`, `int`, `void`).
pub trait Elem {
    /// The C element type.
    const C: &'static str;
}

/// bf16 elements (raw 16-bit storage on the device).
#[derive(Debug)]
pub enum Bf16 {}
/// f32 elements.
#[derive(Debug)]
pub enum F32 {}
/// i32 elements.
#[derive(Debug)]
pub enum I32 {}
/// Untyped (a weight matrix's storage, or bf16-or-f32 output).
#[derive(Debug)]
pub enum Void {}

impl Elem for Bf16 {
    const C: &'static str = "bf16";
}
impl Elem for F32 {
    const C: &'static str = "float";
}
impl Elem for I32 {
    const C: &'static str = "int";
}
impl Elem for Void {
    const C: &'static str = "void";
}

/// A device pointer the kernel reads (`const T*`); 0 is null.
#[repr(transparent)]
#[derive(Debug)]
pub struct In<T: Elem>(pub u64, PhantomData<T>);

/// A device pointer the kernel writes (`T*`).
#[repr(transparent)]
#[derive(Debug)]
pub struct Out<T: Elem>(pub u64, PhantomData<T>);

impl<T: Elem> Clone for In<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Elem> Copy for In<T> {}
impl<T: Elem> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Elem> Copy for Out<T> {}

/// A read pointer to device address `p`.
pub fn rd<T: Elem>(p: u64) -> In<T> {
    In(p, PhantomData)
}

/// A write pointer to device address `p`.
pub fn wr<T: Elem>(p: u64) -> Out<T> {
    Out(p, PhantomData)
}

impl<T: Elem> CType for In<T> {
    fn c_type() -> String {
        format!("const {}*", T::C)
    }
}

impl<T: Elem> CType for Out<T> {
    fn c_type() -> String {
        format!("{}*", T::C)
    }
}

/// Argument structs: a Rust struct with a C twin.
pub trait KernelArgs: Copy {
    /// The C declaration of the struct, with a `static_assert` on its size.
    fn c_decl() -> String;
}

/// Declares `#[repr(C)]` kernel-argument structs and their C twins ([`KernelArgs`]).
macro_rules! kernel_args {
    ($( $(#[$m:meta])* pub struct $name:ident { $( $(#[$fm:meta])* $f:ident : $t:ty ),* $(,)? } )*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy)]
        #[allow(missing_docs)] // fields are the kernel's parameters, named as in the `.cu`
        pub struct $name { $( $(#[$fm])* pub $f: $t ),* }

        impl $crate::cuda::ops::CType for $name {
            fn c_type() -> String {
                stringify!($name).into()
            }
        }

        impl $crate::cuda::ops::KernelArgs for $name {
            fn c_decl() -> String {
                let mut s = format!("struct {} {{", stringify!($name));
                $( s += &format!(" {} {};", <$t as $crate::cuda::ops::CType>::c_type(), stringify!($f)); )*
                s += &format!(" }};\nstatic_assert(sizeof({}) == {}, \"{} differs from src/cuda/ops\");\n",
                    stringify!($name), std::mem::size_of::<$name>(), stringify!($name));
                s
            }
        }
    )*};
}
pub(crate) use kernel_args;

kernel_args! {
    /// A weight matrix `[rows, K]` in one of the device formats (`QMat` in common.cuh, which
    /// the foundry's templates share; its size is checked against this one).
    pub struct QMat {
        /// bf16 `[rows, K]`, or packed u32 codes `[rows, K·bits/32]`.
        w: In<Void>,
        /// Affine scales `[rows, K/group]` (0 for bf16).
        s: In<Bf16>,
        /// Affine biases `[rows, K/group]` (0 for bf16).
        b: In<Bf16>,
        /// 0 = bf16, 1 = MLX affine, 2 = MXFP4 (GPT-OSS expert kernels only, see
        /// [`gpt_oss::FMT_MXFP4`]).
        fmt: i32,
        /// Bits per code (16 for bf16).
        bits: i32,
        /// Group size (0 for bf16).
        group: i32,
    }
}

kernel_args! {
    /// Matrices stacked like experts (`[E, rows, ...]`; also MLA's per-head matrices):
    /// matrix e starts `e·w_stride` storage elements and `e·sb_stride` scales in.
    pub struct Stacked { w: QMat, w_stride: i64, sb_stride: i64 }
}

/// The C prelude compiled between `common.cuh` and the kernels: shared constants, then
/// every argument struct.
pub fn c_prelude() -> String {
    let mut s = format!(
        "#define ATTN_THREADS {ATTN_THREADS}\n#define MAXD {MAX_HEAD_DIM}\n#define MLA_MAXL {MLA_MAX_LATENT}\n\
         #define MLA_MAXR {MLA_MAX_ROPE}\n#define ATTN_HB {}\n#define MLA_HG {}\n#define CONV_MAXL {}\n\
         #define TC_BM {}\n#define DOWN_ROWS {}\n#define ROUTER_BLOCKS {}\n#define ROUTER_THREADS {}\n\
         #define ROUTER_SIGMOID_THREADS {}\n#define NORM_THREADS {}\n#define NORM_QKV_MAXH {}\n",
        attention::ATTN_HEADS_PER_BLOCK,
        mla::MLA_HEADS_PER_BLOCK,
        conv::CONV_MAX_KERNEL,
        gemm::TC_BM,
        moe::MOE_DOWN_ROWS,
        moe::ROUTER_BLOCKS,
        moe::ROUTER_THREADS,
        moe::ROUTER_SIGMOID_THREADS,
        norm::NORM_THREADS,
        linear::NORM_QKV_MAX_HIDDEN
    );
    // QMat itself is declared in common.cuh (the foundry's templates use it): check it.
    s += &format!("static_assert(sizeof(QMat) == {}, \"QMat differs from src/cuda/ops\");\n", size_of::<QMat>());
    s += &Stacked::c_decl();
    for decl in [
        linear::decls(),
        norm::decls(),
        rope::decls(),
        attention::decls(),
        mla::decls(),
        moe::decls(),
        conv::decls(),
        gpt_oss::decls(),
        sample::decls(),
        gemm::decls(),
    ] {
        s += &decl;
    }
    s
}

/// The whole source of the built-in module.
pub fn module_source() -> String {
    let mut s = String::from(crate::kernels::COMMON);
    s += "\n";
    s += &c_prelude();
    for src in SOURCES {
        s += "\n";
        s += src;
    }
    s
}

impl Device {
    /// Launches built-in kernel `name` with its argument struct.
    pub fn launch_args<A: KernelArgs>(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &A) -> Result<()> {
        self.launch_struct(name, grid, block, args as *const A as *mut std::ffi::c_void)
    }
}

/// `n` as a C `int` (sizes are checked against the model's limits before any launch).
pub fn int(n: usize) -> i32 {
    n as i32
}

/// Grid size over `n` items, `per` a block.
pub fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_decls_mirror_the_rust_layout() {
        let d = QMat::c_decl();
        assert!(d.starts_with(
            "struct QMat { const void* w; const bf16* s; const bf16* b; int fmt; int bits; int group; };"
        ));
        assert!(d.contains("static_assert(sizeof(QMat) == 40"), "{d}");
        let src = module_source();
        // Every kernel of the module takes exactly one argument struct declared in the prelude.
        let sigs: Vec<&str> = src.split("__global__ void ").skip(1).collect();
        assert!(sigs.len() >= 30, "{} kernels", sigs.len());
        for rest in sigs {
            let (name, params) = rest.split_once('(').expect("a kernel's parameter list");
            let params = params.split(')').next().unwrap_or("").trim();
            let parts: Vec<&str> = params.split_whitespace().collect();
            assert!(parts.len() == 3 && parts[0] == "const" && !params.contains(','), "{name}({params})");
            assert!(src.contains(&format!("struct {} {{", parts[1])), "{name}: {} is not declared", parts[1]);
        }
    }

    /// Under programmatic dependent launch a kernel may start while the previous one still
    /// runs: one that read its inputs before `pdl_entry()` would read stale data. So the first
    /// statement of every built-in kernel is `pdl_entry();`.
    #[test]
    fn every_kernel_starts_with_pdl_entry() {
        let src = module_source();
        let mut n = 0;
        for rest in src.split("__global__ void ").skip(1) {
            let name = rest.split('(').next().unwrap_or("?");
            let body = rest.split_once('{').map(|(_, b)| b).unwrap_or("");
            let first = body.trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            assert!(first.starts_with("pdl_entry();"), "kernel {name} does not start with pdl_entry()");
            n += 1;
        }
        assert!(n >= 30, "{n} kernels");
    }
}
